"""The two ways qexport refuses: bad input (exit 2) and a failed verification (exit 1)."""


class InputError(Exception):
    """Bad input or usage. The message is one line naming the file, tensor or option and the problem."""

    exit_code = 2


class VerificationFailed(Exception):
    """A verification check failed; the message names the check and by how much."""

    exit_code = 1


def not_a_model_folder(folder, command: str) -> InputError | None:
    """The error for a folder with no config.json and no *.safetensors, naming the model folders inside it (an
    export root OUT holds OUT/fp16, OUT/int8, ...): what `command` should be pointed at instead. None when FOLDER
    looks like a model folder."""
    from pathlib import Path

    folder = Path(folder)
    if (folder / "config.json").exists() or any(folder.glob("*.safetensors")):
        return None
    inside = sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())
    hint = f"; {command} one format folder: {', '.join(str(folder / f) for f in inside)}" if inside else ""
    return InputError(f"{folder}: not a model folder (no config.json and no *.safetensors){hint}")
