"""Whether ``comfy.cli_args`` parses ``sys.argv`` when it is imported (off by default)."""

args_parsing = False


def enable_args_parsing(enable=True):
    global args_parsing
    args_parsing = enable
