"""The two ways qexport refuses: bad input (exit 2) and a failed verification (exit 1)."""


class InputError(Exception):
    """Bad input or usage. The message is one line naming the file, tensor or option and the problem.

    `advice` is what to do instead, when that is a command to copy (the pickle refusal's conversion): bounded text
    the command line prints whole after the message, which it shortens if a huge path or name makes it long."""

    exit_code = 2

    def __init__(self, message: str, advice: str | None = None):
        super().__init__(message)
        self.advice = advice

    def __str__(self) -> str:
        return str(self.args[0]) + (f"; {self.advice}" if self.advice else "")


class VerificationFailed(Exception):
    """A verification check failed; the message names the check and by how much."""

    exit_code = 1


def not_a_model_folder(folder, command: str, only_with_models: bool = False) -> InputError | None:
    """The error for a folder with no config.json and no *.safetensors, naming the model folders inside it (an
    export root OUT holds OUT/fp16, OUT/int8, ...): what `command` should be pointed at instead. None when FOLDER
    looks like a model folder, or (`only_with_models`) when it holds no model folder to name either."""
    from pathlib import Path

    folder = Path(folder)
    if (folder / "config.json").exists() or any(folder.glob("*.safetensors")):
        return None

    def holds_config(sub) -> bool:
        try:
            return (sub / "config.json").is_file()
        except OSError:  # an unreadable entry (permission denied) is no model folder to name
            return False

    inside = sorted(p.name for p in folder.iterdir() if holds_config(p))
    if only_with_models and not inside:
        return None
    hint = f"; {command} one format folder: {', '.join(str(folder / f) for f in inside)}" if inside else ""
    return InputError(f"{folder}: not a model folder (no config.json and no *.safetensors){hint}")
