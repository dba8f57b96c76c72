"""Megatron-Bridge's training loop on CPU with gloo: the shims the lab's Bridge runs need.

Bridge (megatron-bridge 0.6.2) imports three GPU-only packages at module level in its training
path: Transformer Engine (`peft/lora_layers.py`), NVIDIA ModelOpt (`training/train.py`,
`eval.py`, `gpt_step.py`, `checkpointing.py`, the distillation modules) and NVIDIA Resiliency
Extension (`training/pretrain.py`). Many other modules, in Bridge and in Megatron-Core, probe the
same packages with `try: import transformer_engine` and take their GPU paths when it succeeds,
so a stub in `sys.modules` for everyone would switch those on. Instead each stub is in
`sys.modules` only while the one Bridge module that needs it executes (`_StubbedImports`): that
module binds the stub's names, every probe elsewhere still finds the package missing.

The stand-ins do what the real functions do for a model that ModelOpt never converted (no
distillation, no quantization state) and are never reached otherwise: a stub name that is
called where these runs do not call it raises.

`install_bridge_shims()` adds them, the CUDA-runtime shims of `harness`, the CPU steps of
Bridge's set-up and local layers for `transformer_impl="local"`
(`harness.install_megatron_lm_shims` does the same for Megatron-LM's loop).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _Absent:
    """A class of a GPU-only package that these runs never instantiate (an annotation, a base,
    an isinstance target)."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__qualname__} is a CPU stand-in of the lab "
                           "(megatron_gbl_lab.bridge_cpu): this run reached GPU-only code")


def _absent(qualname: str) -> type:
    return type(qualname, (_Absent,), {"__qualname__": qualname})


class _AbsentNames(types.ModuleType):
    """A stub module whose every attribute is an `_Absent` class (Transformer Engine's
    `te.ops.Sequential`, `te.Linear`, ... in annotations and isinstance checks)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _AbsentNames(f"{self.__name__}.{name}") if name.islower() else \
            _absent(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _no_modelopt_state(*args, **kwargs) -> None:
    """ModelOpt's save / restore of its state: nothing to do for a model it never converted."""


def _modelopt() -> dict[str, types.ModuleType]:
    distill = _module("modelopt.torch.distill", DistillationModel=_absent("DistillationModel"))
    megatron = _module(
        "modelopt.torch.distill.plugins.megatron",
        DistillationConfig=type("DistillationConfig", (), {}),
        # None for a model that is not a DistillationModel, as ModelOpt returns.
        get_tensor_shapes_adjust_fn_for_distillation=lambda *args, **kwargs: None)
    opt_plugins = _module("modelopt.torch.opt.plugins", restore_modelopt_state=_no_modelopt_state,
                          save_modelopt_state=_no_modelopt_state,
                          save_sharded_modelopt_state=_no_modelopt_state)
    return _package_tree(distill, megatron, opt_plugins)


def _nvidia_resiliency_ext() -> dict[str, types.ModuleType]:
    return _package_tree(_module("nvidia_resiliency_ext.inprocess",
                                 CallWrapper=_absent("CallWrapper")))


def _transformer_engine() -> dict[str, types.ModuleType]:
    return _package_tree(_AbsentNames("transformer_engine.pytorch"))


def _package_tree(*leaves: types.ModuleType) -> dict[str, types.ModuleType]:
    """The leaves and every parent package, each parent holding its children as attributes."""
    modules = {leaf.__name__: leaf for leaf in leaves}
    for leaf in leaves:
        parts = leaf.__name__.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:depth])
            modules.setdefault(parent, _module(parent))
            setattr(modules[parent], parts[depth], modules[".".join(parts[:depth + 1])])
    return modules


# Bridge module -> the stub packages it imports at module level.
_NEEDS = {
    "megatron.bridge.peft.lora_layers": _transformer_engine,
    "megatron.bridge.training.pretrain": _nvidia_resiliency_ext,
    "megatron.bridge.training.train": _modelopt,
    "megatron.bridge.training.eval": _modelopt,
    "megatron.bridge.training.gpt_step": _modelopt,
    "megatron.bridge.training.checkpointing": _modelopt,
    "megatron.bridge.training.post_training.distillation": _modelopt,
    "megatron.bridge.models.distillation_provider": _modelopt,
}


class _StubbedImports(importlib.abc.MetaPathFinder):
    """Finds the modules of `_NEEDS` as usual, and runs each with the stubs of the packages in
    `missing` (those not installed) in sys.modules."""

    def __init__(self, missing: set[str]):
        self.missing = missing

    def find_spec(self, fullname, path, target=None):
        if fullname not in _NEEDS:
            return None
        stubs = {name: module for name, module in _NEEDS[fullname]().items()
                 if name.split(".")[0] in self.missing}
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and stubs:
            spec.loader = _LoaderWithStubs(spec.loader, stubs)
        return spec


class _LoaderWithStubs(importlib.abc.Loader):
    def __init__(self, loader, stubs: dict[str, types.ModuleType]):
        self.loader, self.stubs = loader, stubs

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # Modules of _NEEDS import each other: the outermost one's stubs serve them all.
        added = {name: stub for name, stub in self.stubs.items() if name not in sys.modules}
        sys.modules.update(added)
        try:
            self.loader.exec_module(module)
        finally:
            for name in added:
                del sys.modules[name]


def install_bridge_shims() -> None:
    """Make Megatron-Bridge's `pretrain` / `finetune` run on CPU with gloo (idempotent): the
    stub packages above, the CUDA-runtime shims, the CUDA-only steps of Bridge's set-up, its
    checkpoint writer's helper process, local layers on request. Call it before anything
    imports `megatron.bridge`."""
    from megatron_gbl_lab import harness

    if any(isinstance(finder, _StubbedImports) for finder in sys.meta_path):
        return
    harness.install_cuda_runtime_shims()
    # Megatron-Core's own probes run before any stub can exist.
    importlib.import_module("megatron.core.extensions.transformer_engine")
    missing = {package for package in ("transformer_engine", "modelopt", "nvidia_resiliency_ext")
               if importlib.util.find_spec(package) is None}
    sys.meta_path.insert(0, _StubbedImports(missing))
    initialize = importlib.import_module("megatron.bridge.training.initialize")
    setup = importlib.import_module("megatron.bridge.training.setup")
    # setup() asserts "Megatron requires CUDA" unless initialize_megatron(allow_no_cuda=True).
    harness._set(setup, "initialize_megatron",
                 functools.partial(initialize.initialize_megatron, allow_no_cuda=True))
    # `make` for the dataset helpers (the megatron-core wheel ships them built).
    harness._set(initialize, "compile_helpers", lambda: None)
    # Warms up fused kernels with CUDA tensors; CPU runs turn those fusions off.
    harness._set(setup, "set_jit_fusion_options", lambda *args, **kwargs: None)
    # Bridge's checkpoint writer collects results through a Manager process it starts with
    # spawn: a fresh interpreter that imports `__main__` again (under `-m megatron_gbl.bridge`,
    # the recipe script), without these stubs. A forked one has them.
    filesystem_async = importlib.import_module(
        "megatron.core.dist_checkpointing.strategies.filesystem_async")
    harness._set(filesystem_async, "get_write_results_queue", functools.partial(
        filesystem_async.get_write_results_queue, mp_mode="fork"))
    # A GPTModelProvider's default layers are Transformer Engine's whatever its transformer_impl;
    # "local" (a recipe's `model.transformer_impl=local` override) gets Megatron-Core's local
    # layers, as Megatron-LM's --transformer-impl local does.
    gpt_provider = importlib.import_module("megatron.bridge.models.gpt_provider")
    te_layers = gpt_provider.transformer_engine_layer_spec
    harness._set(gpt_provider, "transformer_engine_layer_spec", lambda config: (
        gpt_provider.local_layer_spec(config) if config.transformer_impl == "local"
        else te_layers(config)))

