"""Jobs a recipe can run (`job:` key): each module has `ARGUMENT_CLASSES` and `run(*parsed)`."""
