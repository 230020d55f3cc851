"""User-facing errors: each names what was wrong and what to do. The CLI prints them without a
traceback; anything else is a bug and keeps its traceback."""


class RtmlError(Exception):
    """An error whose message is meant for the person running rtml."""


class NotImplementedYet(RtmlError):
    def __init__(self, command: str, issue: str):
        super().__init__(f"`rtml {command}` is not implemented yet (it arrives with the {issue} issue).")
