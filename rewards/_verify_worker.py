"""Child process for rewards.correctness: reads JSON lines [response, gold, timeout_s] on stdin, writes one
score per line on stdout. Runs as a plain script (``python _verify_worker.py``) so it needs nothing from
the parent and its main thread can use math-verify's signal-based timeouts."""

import json
import sys


def score(response: str, gold: str, timeout_s: int) -> float:
    from math_verify import parse, verify

    gold_parsed = parse(gold, parsing_timeout=timeout_s)
    if not gold_parsed:  # plain strings such as "1/2" or "\frac{1}{2}" parse best as inline math
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout_s)
    pred_parsed = parse(response, parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s) else 0.0


def main() -> None:
    import math_verify  # noqa: F401  - import once, before the first timed sample

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        response, gold, timeout_s = json.loads(line)
        try:
            result = score(response, gold, timeout_s)
        except Exception:  # noqa: BLE001 - timeouts and pathological input score 0
            result = 0.0
        sys.stdout.write(f"{result}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
