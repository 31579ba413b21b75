"""The `vitscale` command line: a thin layer over the library. `main` parses the arguments
(cli.parser, with a flag per config field from cli.flags), runs the command's function
(cli.commands, which prints with cli.tables) and turns what went wrong into an exit code.

    vitscale models                          presets with params, GFLOPs, acts
    vitscale cost B/16 --image-size 384      cost of one config
    vitscale scale S/16 --strategy d,w,d1_w8_r1 --factors 1,2,4,8 [--measure]
    vitscale bench S/16 --batch 32 --dtype bf16
    vitscale train [--config FILE.yaml] [--model PRESET] [--out DIR] [--section.key=value ...]
    vitscale pretrain / finetune --init RUN_DIR [--linear-probe] / eval RUN_DIR
    vitscale distill --teacher RUN_DIR --model pico/4  a student taught by a frozen teacher
    vitscale convert SRC --to hf|timm|vitscale OUT    weights between formats
    vitscale soup RUN RUN ... --out DIR [--greedy]  average fine-tuned runs (model soups)
    vitscale config pretrain [--json]        a command's resolved config, every field with its help
    vitscale export RUN --to onnx [--out FILE] [--batch dynamic|N]  the run's model as an ONNX graph
    vitscale predict RUN FILE_OR_DIR... [--top-k 5] [--json]  classify files with a trained run

User errors (unknown preset, bad strategy, a size the patch does not divide) end in one
line on stderr and exit code 2; a training stopped by a non-finite loss exits 3, one stopped
by a signal (after a checkpoint) 4; anything else is a bug: one line naming the file that
holds its traceback, exit 1 (`vitscale --debug ...` shows it instead).
"""

from __future__ import annotations

import re
import sys

from vitscale.cli.parser import build_parser
from vitscale.common import errors, logs
from vitscale.common.errors import UserError

__all__ = ["main"]

# the commands that take --section.key=value overrides past their own flags
TAKES_OVERRIDES = ("train", "pretrain", "finetune", "distill", "study", "config")


def main(argv: list[str] | None = None) -> int:
    """Run `vitscale ARGV...` (default: sys.argv[1:]); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    words = [a for a in argv if not a.startswith("-")]  # the command (and config's COMMAND), roughly
    fields_for = " ".join(words[:2] if words[:1] == ["config"] else words[:1])
    parser, args = build_parser(fields_for), None
    try:
        args, extra = parser.parse_known_args(argv)
        # where stdout carries data (--json, predictions), what the library says goes to stderr
        logs.setup(stderr=getattr(args, "json", False) or getattr(args, "command", None) == "predict")
        if extra and args.command not in TAKES_OVERRIDES:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command in (*TAKES_OVERRIDES, "eval"):
            args.run(args, extra)
        else:
            args.run(args)
    except UserError as e:  # a user's mistake: one line, no traceback
        print(f"vitscale: error: {' '.join(str(e).split())}", file=sys.stderr)
        return errors.EXIT_USER
    except errors.StopTraining as e:
        print(f"vitscale: stopped: {e}", file=sys.stderr)
        return errors.EXIT_STOPPED
    except errors.Interrupted as e:
        print(f"vitscale: interrupted: {e}", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops at a checkpoint itself)
        print("vitscale: interrupted: SIGINT", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except Exception as e:  # a bug: say so in one line, keep the traceback
        if getattr(args, "debug", False):
            raise
        return _bug(e)
    return 0


def _bug(e: Exception) -> int:
    """Report an unexpected exception: out of memory is the user's to fix (exit 2); anything
    else is a bug, its traceback saved to a file (exit 1)."""
    if _out_of_memory(e):
        print(f"vitscale: error: {_out_of_memory(e)}", file=sys.stderr)
        return errors.EXIT_USER
    path = errors.write_crash(e)
    print(f"vitscale: internal error (a bug, not your input): {type(e).__name__}: {e}; "
          f"traceback in {path} (or rerun with --debug)", file=sys.stderr)
    return errors.EXIT_BUG


def _out_of_memory(e: Exception) -> str:
    """One line for an allocation torch could not make (too large a model, batch or input), else ''."""
    text = str(e)
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text):
        return ""
    asked = re.search(r"allocate (\d+) bytes", text)
    what = f"{int(asked.group(1)) / 2**30:.3g} GB asked for" if asked else text.split("\n")[0][:120]
    return f"out of memory ({what}): lower the batch, the model or the input size"
