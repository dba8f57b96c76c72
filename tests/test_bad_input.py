"""Bad input fails before training with a message that names the flag (or argument) and the
fix; docs/bad_input.md shows exactly these messages (catalog: tests/bad_input.py)."""

import os

import pytest

import bad_input

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "bad_input.md")


@pytest.mark.parametrize("case", list(bad_input.MEGATRON_LM))
def test_megatron_lm_flags(case):
    message = bad_input.megatron_lm_message(case)
    for fragment in bad_input.MEGATRON_LM[case][1]:
        assert fragment in message, (case, message)


@pytest.mark.parametrize("case", list(bad_input.PYTHON_API))
def test_python_api(case):
    message = bad_input.python_api_message(case)
    for fragment in bad_input.PYTHON_API[case][2]:
        assert fragment in message, (case, message)


@pytest.mark.parametrize("case", list(bad_input.LAUNCHER))
def test_launcher(case):
    message = bad_input.launcher_message(case)
    for fragment in bad_input.LAUNCHER[case][1]:
        assert fragment in message, (case, message)


needs_quantile_balancing = pytest.mark.skipif(
    not bad_input.has_quantile_balancing(), reason="quantile balancing needs megatron-core>=0.19")


@needs_quantile_balancing
@pytest.mark.parametrize("case", list(bad_input.QUANTILE_MEGATRON_LM))
def test_quantile_balancing_megatron_lm_flags(case):
    message = bad_input.megatron_lm_message(case)
    for fragment in bad_input.QUANTILE_MEGATRON_LM[case][1]:
        assert fragment in message, (case, message)


@needs_quantile_balancing
@pytest.mark.parametrize("case", list(bad_input.QUANTILE_PYTHON_API))
def test_quantile_balancing_python_api(case):
    message = bad_input.python_api_message(case)
    for fragment in bad_input.QUANTILE_PYTHON_API[case][2]:
        assert fragment in message, (case, message)


@needs_quantile_balancing
def test_quantile_balancing_at_the_first_training_call():
    import workers
    from megatron_gbl_lab.harness import run_gloo

    messages = run_gloo(workers.quantile_bad_input_messages, 1)[0]
    assert messages.keys() == bad_input.QUANTILE_RUNTIME.keys()
    with open(DOC) as f:
        doc = f.read()
    for case, words in bad_input.QUANTILE_RUNTIME.items():
        assert all(word in messages[case] for word in words), (case, messages[case])
        assert bad_input._cell(messages[case]) in doc, f"{case}: docs/bad_input.md is stale"


def test_python_api_enable_rejects_and_leaves_upstream_untouched():
    import megatron_gbl

    for case, (kwargs, overrides, _) in bad_input.PYTHON_API.items():
        if overrides is None:
            with pytest.raises(ValueError):
                megatron_gbl.enable(**kwargs)
            assert not megatron_gbl.is_enabled(), case


def test_doc_table_is_current():
    with open(DOC) as f:
        doc = f.read()
    assert len(bad_input.MEGATRON_LM) + len(bad_input.PYTHON_API) + len(bad_input.RUNTIME) >= 15
    stale = [case for case in bad_input.MEGATRON_LM
             if bad_input._cell(bad_input.megatron_lm_message(case)) not in doc]
    stale += [case for case in bad_input.PYTHON_API
              if bad_input._cell(bad_input.python_api_message(case)) not in doc]
    stale += [case for case in bad_input.LAUNCHER
              if bad_input._cell(bad_input.launcher_message(case)) not in doc]
    if bad_input.has_quantile_balancing():
        stale += [case for case in bad_input.QUANTILE_MEGATRON_LM
                  if bad_input._cell(bad_input.megatron_lm_message(case)) not in doc]
        stale += [case for case in bad_input.QUANTILE_PYTHON_API
                  if bad_input._cell(bad_input.python_api_message(case)) not in doc]
    assert not stale, f"docs/bad_input.md is stale for {stale}: python tests/bad_input.py > docs/bad_input.md"

