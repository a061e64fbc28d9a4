"""Stage import_model: convert a GGUF student once into a safetensors folder, models/base/.

With import_model.gguf null there is nothing to convert, and models/base/ holds only IMPORT.json saying so.
"""

from redistill import paths
from redistill.errors import run_stage
from redistill.io import atomic_dir, write_json
from redistill.params import load_block, read_params_file
from redistill.student import ImportParams, import_gguf


def main() -> None:
    params = load_block(ImportParams, "import_model", read_params_file())
    with atomic_dir(paths.BASE_MODEL) as staging:
        info = import_gguf(params.gguf, staging) if params.gguf else {"gguf": None}
        write_json(staging / "IMPORT.json", info)
    print(info)


if __name__ == "__main__":
    run_stage(main)
