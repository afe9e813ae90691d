"""Run lmms-eval with a visual-token budget on every request to an OpenAI-compatible server.

lmms-eval's OpenAI-compatible models (``--model openai_compatible`` / ``openai_compatible_chat``) build the
request body themselves and have no option for extra fields. This launcher patches the ``openai`` SDK's
``chat.completions.create`` (sync and async) to add ``extra_body={"visual_token_budget": K,
"visual_token_selector": S}`` -- top-level body fields that the plugin's middleware reads -- and then runs
lmms-eval's own command line with the remaining arguments::

    export OPENAI_API_BASE=http://localhost:8000/v1 OPENAI_API_KEY=EMPTY
    python benchmarks/lmms_eval_budget.py --visual-token-budget 64 --visual-token-selector textscythe -- \\
        --model openai_compatible --model_args model_version=llava-hf/llava-1.5-7b-hf \\
        --tasks pope,textvqa_val --batch_size 16 --output_path results/tsc64

Without ``--visual-token-budget`` nothing is patched (the unpruned baseline). The alternative that needs no
client change at all is a server-wide default: ``vllm serve ... --mm-processor-kwargs
'{"visual_token_budget": 64}'`` (one server per budget).
"""

from __future__ import annotations

import argparse
import functools
import sys


def install(extra_body: dict[str, object]) -> None:
    """Make every ``client.chat.completions.create`` (sync and async) send ``extra_body`` too.

    A caller's own ``extra_body`` keys win over these.
    """
    from openai.resources.chat.completions import AsyncCompletions, Completions

    def with_extra(create):
        if getattr(create, "_textscythe_extra", None) is not None:  # installed before: patch the original
            create = create.__wrapped__

        @functools.wraps(create)
        def wrapper(self, *args, **kwargs):
            kwargs["extra_body"] = {**extra_body, **(kwargs.get("extra_body") or {})}
            return create(self, *args, **kwargs)  # for AsyncCompletions this is the coroutine: awaited by the caller

        wrapper._textscythe_extra = dict(extra_body)  # type: ignore[attr-defined]
        return wrapper

    Completions.create = with_extra(Completions.create)
    AsyncCompletions.create = with_extra(AsyncCompletions.create)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--visual-token-budget K] [--visual-token-selector S] -- "
                                           "LMMS_EVAL_ARGS...")
    parser.add_argument("--visual-token-budget", type=int, default=None, help="visual tokens kept per image")
    parser.add_argument("--visual-token-selector", default=None, help="selector (server default: textscythe)")
    args, rest = parser.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if args.visual_token_budget is not None and args.visual_token_budget < 1:
        parser.error("--visual-token-budget must be >= 1")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    extra: dict[str, object] = {}
    if args.visual_token_budget is not None:
        extra["visual_token_budget"] = args.visual_token_budget
    if args.visual_token_selector is not None:
        extra["visual_token_selector"] = args.visual_token_selector
    if extra:
        install(extra)
    print(f"lmms-eval with extra request fields {extra or '(none: no pruning)'}", file=sys.stderr)
    from lmms_eval.__main__ import cli_evaluate  # the `lmms-eval` console script

    sys.argv = ["lmms-eval", *rest]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
