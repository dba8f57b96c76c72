ARGS = None


def get_args():
    return ARGS
