"""Quantized moments: what each piece of the fused steps (8-bit, fp8, 4-bit) costs per element, one thread.

Builds ``benchmarks/cpp/quantized_codec.cc`` with the fused kernel's own flags
(``adamx.fused._build.flags()``, ``-O3 -march=native``; it includes ``kernel.cc``, so it
times the kernel's functions) and prints ns/element, best of many rounds:

* ``decode_loop`` / ``decode_table``: one moment decoded, the portable loop (a lookup per
  element) and ``TableDecoder`` (AVX-512 VBMI byte permutes where the CPU has them);
* ``encode_mu`` / ``encode_nu``: absmax and nearest code (``TableEncoder``: one table lookup
  and one compare per element);
* ``f32_step_L1`` / ``_L2`` / ``_stream``: the float32 step (the arithmetic both steps share),
  with its arrays in L1, in L2, and streamed from memory (``--n`` elements);
* ``q8_step_L2`` / ``_stream``: the whole 8-bit step (decode, step, encode per block);
* ``fp8_*`` / ``4bit_*``: the same pieces for ``moment_format="fp8"`` / ``"4bit"`` (adamx/_lowbit.h:
  decode, encode of ``mu`` and ``nu``, the whole step in L2 and streamed).

Writes ``benchmarks/results/quantized_codec.json``.

    PYTHONPATH=. python benchmarks/quantized_codec.py [--n 16777216]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np

from adamx._quantize import SIGNED_DYNAMIC_MAP, UNSIGNED_DYNAMIC_MAP
from adamx.fused import _build, _kernel
from benchmarks import record

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quantized_codec.json"))
    args = ap.parse_args()
    cxx = _build._compiler()
    assert cxx is not None, "needs a C++ compiler"
    with tempfile.TemporaryDirectory() as tmp:
        maps = os.path.join(tmp, "maps.bin")
        tables = [SIGNED_DYNAMIC_MAP, UNSIGNED_DYNAMIC_MAP, _kernel._LOWBIT_TABLES]
        np.concatenate(tables).astype(np.float32).tofile(maps)
        exe = os.path.join(tmp, "quantized_codec")
        fl = [x for x in _build.flags() if x not in ("-shared", "-fPIC")]
        src = os.path.join(HERE, "cpp", "quantized_codec.cc")
        cmd = [*_build.command(cxx, fl, exe, src, extra=["-I", os.path.dirname(_build.SOURCE)]), "-lpthread"]
        subprocess.run(cmd, check=True)
        load_before = os.getloadavg()
        res = json.loads(subprocess.run([exe, maps, str(args.n)], check=True, capture_output=True, text=True).stdout)
        load_after = os.getloadavg()
    res.pop("sink")
    print(json.dumps(res, indent=1))
    vbmi = res.pop("vbmi")  # which decoder this CPU ran; the rest are ns per element
    rows = [{"piece": k, "ns_per_element": v} for k, v in res.items()]
    compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    summary = {
        "vbmi": vbmi,
        "load_before": load_before[0],
        "load_after": load_after[0],
        "compiler": compiler,
        "flags": " ".join(fl),
    }
    record.write(args.out, "quantized_codec", rows, {"n": args.n}, summary)


if __name__ == "__main__":
    main()
