"""`redistill merge`: the adapter folded into its base model, saved as a standalone model folder.

The folder loads in `redistill extract`, plain transformers and vLLM. Its chat template puts the system prompt
the student was trained with in front of any conversation that has none, so a server's client sends only the
sentence; its generation config stops at the end-of-turn token.
"""

import argparse
import json
import sys
from pathlib import Path

from redistill import paths
from redistill.errors import PipelineError
from redistill.io import atomic_dir
from redistill.models import is_adapter, load_trained, trained_with, write_trained_with
from redistill.prompts import stop_token_ids


def with_default_system_prompt(template: str, system_prompt: str) -> str:
    """``template`` preceded by Jinja that adds ``system_prompt`` as the first message when none is given."""
    literal = json.dumps(system_prompt)  # a JSON string is a valid Jinja string literal
    return (
        "{%- if messages[0]['role'] != 'system' -%}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}"
        "{%- endif -%}" + template
    )


def merge(model: str, base: str | None, output: str, device: str = "cpu") -> None:
    """Fold the adapter ``model`` into its base (or take a model trained in full as it is) and write a standalone
    model folder to ``output`` (atomically)."""
    folder = Path(model)
    if not is_adapter(folder) and not trained_with(folder):
        raise PipelineError(
            f"{model} is not an adapter folder (no adapter_config.json) nor a model trained in full by redistill "
            "(no redistill.json); nothing to merge"
        )
    if Path(output).resolve() == Path(model).resolve():
        raise PipelineError("--output must not be the adapter's own folder")
    loaded = load_trained(model, base, device, dtype="auto")
    tokenizer, merged = loaded.tokenizer, loaded.model
    tokenizer.chat_template = with_default_system_prompt(tokenizer.chat_template, loaded.system_prompt)
    merged.generation_config.eos_token_id = stop_token_ids(tokenizer)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(output) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_trained_with(staging, loaded.base_model, loaded.system_prompt, adapter=str(model))
    print(f"merged {model} into {output}", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    merge(args.model, args.base, args.output, args.device)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "merge", help="fold the adapter into its base model: one standalone model folder", description=__doc__
    )
    parser.add_argument("--model", default=str(paths.ADAPTER), help="the adapter folder")
    parser.add_argument("--base", help="the adapter's base model (default: the one its adapter_config.json names)")
    parser.add_argument("--output", "-o", default="models/merged", help="the model folder to write")
    parser.add_argument("--device", default="cpu", help="where to merge: cpu (default), cuda or cuda:N")
    parser.set_defaults(run=run)
