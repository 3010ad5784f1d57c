#!/usr/bin/env python
"""Check our SGLang usage against any SGLang release, and list what changed against the pin.

    python tools/sglang_contract.py --version 0.5.24      # before moving the pin
    python tools/sglang_contract.py                       # the pinned version
    python tools/sglang_contract.py --wheel path/to/sglang-X-*.whl

Downloads the wheel (``pip download --no-deps``, cached in ``~/.cache/areal-hpc/wheels`` or
``$AREAL_HPC_CACHE/wheels``), reads it without importing SGLang, and runs:

1. the flag check: every flag our command builder emits is declared by that version;
2. the contract check: routes, request fields and types, sampling keys, response keys
   (`areal_hpc.inference.sglang_contract.check_ours`);
3. for another version than the pin: what changed in routes, the request structs of the routes we
   use, sampling params, ``meta_info`` keys and finish types, and the flags we emit.

Exit status: 0 when our code fits that version, 1 when it does not (problems listed), 2 when the
wheel cannot be had. Moving the pin = this command passing, then changing ``SGLANG_VERSION`` and
setup.cfg's ``sglang==`` together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from areal_hpc.inference import sglang_api as api  # noqa: E402
from areal_hpc.inference import sglang_contract as sc  # noqa: E402
from areal_hpc.inference.sglang import SGLANG_VERSION, declared_flags  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/sglang_contract.py", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--version", default=None, help=f"SGLang version to check (default: the pin, {SGLANG_VERSION})")
    g.add_argument("--wheel", default=None, help="an SGLang wheel file instead of a download")
    p.add_argument("--no-diff", action="store_true", help="do not compare with the pinned version")
    a = p.parse_args(argv)
    try:
        wheel = Path(a.wheel) if a.wheel else sc.download_wheel(a.version or SGLANG_VERSION)
        pin_wheel = None if a.no_diff else sc.download_wheel(SGLANG_VERSION)
    except Exception as e:
        print(f"sglang_contract: error: {e}", file=sys.stderr)
        return 2
    contract = sc.read_contract(wheel)
    v = contract.version
    print(f"SGLang {v} ({wheel})")

    flags = declared_flags(wheel)
    flag_problems = sc.flag_problems(flags)
    problems = sc.check_ours(contract, api)
    print(f"\nflags: {len(flags)} declared; {'OK' if not flag_problems else f'{len(flag_problems)} problem(s)'}")
    for x in flag_problems:
        print(f"  ! {x}")
    print(f"contract: {len(contract.routes)} routes, {len(contract.meta_keys)} meta_info keys; "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    for x in problems:
        print(f"  ! {x}")
    for x in sc.reads_with_fallback(contract, api):
        print(f"  read only when present (fallback tested): {x}")

    if pin_wheel is not None and Path(pin_wheel).resolve() != Path(wheel).resolve():
        pinned = sc.read_contract(pin_wheel)
        used = {pinned.routes[r.path].request for r in api.ROUTES if r.path in pinned.routes}
        used |= {contract.routes[r.path].request for r in api.ROUTES if r.path in contract.routes}
        diff = sc.diff_contracts(pinned, contract, used_structs=used - {None})
        old_flags = declared_flags(pin_wheel)
        added, removed = sorted(set(flags) - set(old_flags)), sorted(set(old_flags) - set(flags))
        kinds = sorted(f for f in set(flags) & set(old_flags) if flags[f] != old_flags[f])
        print(f"\nchanges from the pin {SGLANG_VERSION} to {v}:")
        for line in diff:
            print(f"  {line}")
        print(f"  flags: {len(added)} added, {len(removed)} removed, {len(kinds)} changed kind")
        for f in removed:
            print(f"  - flag {f}")
        for f in kinds:
            print(f"  ~ flag {f}: {'bare' if old_flags[f] else 'value'} -> {'bare' if flags[f] else 'value'}")
        if not diff and not added and not removed and not kinds:
            print("  (none that we can see)")
    return 1 if problems or flag_problems else 0


if __name__ == "__main__":
    sys.exit(main())
