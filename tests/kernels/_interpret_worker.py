"""Run the kernel checks on CPU in Triton's interpreter; prints one JSON line {"kind/case": "ok" | error}.

Run as `python -m tests.kernels._interpret_worker` from the repository root. TRITON_INTERPRET must be set
before triton decorates the kernels, so this runs in its own process (tests/kernels/conftest.py starts it)
and sets the variable before importing anything that imports triton.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)  # the interpreter is numpy-bound; leave the other core to pytest's siblings
    from megamoe.kernels import causal_conv1d, selective_scan, selective_state_update
    from megamoe.kernels.launch import interpreting
    from tests.kernels._checks import CHECKS, MARKER

    kernels = (selective_scan._scan_fwd_kernel, selective_scan._scan_bwd_kernel,
               selective_state_update._state_update_kernel, causal_conv1d._conv_fwd_kernel)
    compiled = [k.fn.__name__ for k in kernels if not interpreting(k)]
    results = {}
    for kind, (check, cases) in CHECKS.items():
        for case, kwargs in cases.items():
            if compiled:
                results[f"{kind}/{case}"] = f"kernels {compiled} were compiled, not interpreted"
                continue
            try:
                check("cpu", **kwargs)
                results[f"{kind}/{case}"] = "ok"
            except Exception:  # report every failure, keep checking the other cases
                results[f"{kind}/{case}"] = traceback.format_exc(limit=4)
    sys.stdout.write(MARKER + json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
