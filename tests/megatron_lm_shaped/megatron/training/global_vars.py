ARGS = None
