"""Record the numbers `tests/test_regression.py` compares with, from any checkout of this project, on this machine.

    python tests/record_regression.py --root /path/to/checkout-of-c407b81 --out tests/data/regression_c407b81.json

CPU results depend on the kind of processor (its vector instructions select different oneDNN and MKL kernels, which
sum in other orders), so the record holds one entry per CPU kind (`cpu_kind()`): this script runs the recorded
commands (the original model, both Retrain references and every case of the existing record) with the entry scripts
of `--root`, each in a fresh interpreter, and adds or replaces this machine's entry. Run it on the commit the record
is named after, never on the code under test: the guard then says that today's code gives that commit's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from regression_record import CASE_KEYS, RECORD_THREADS, case_folder, checksum, cpu_kind  # noqa: E402


def run(root: Path, script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(RECORD_THREADS)}
    proc = subprocess.run([sys.executable, str(root / script), *args], cwd=root, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"{script} {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def record(root: Path, template: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base = template["base"]
        run(root, "main_baseline.py", *base, "--save_dir", str(out))
        for scenario in ("random", "classwise"):
            run(root, "main_baseline.py", *base, *template[scenario], "--save_dir", str(out), "--retrain")
        original = checksum(out / "1resnet18_ep3model_SA_best.pth.tar")
        cases = []
        for case in template["cases"]:
            folder = case_folder(out, case)
            folder.mkdir()
            for f in out.glob("*.pth.tar"):
                (folder / f.name).symlink_to(f)
            run(root, "main_forget.py", *base, *template[case["scenario"]], "--save_dir", str(folder),
                "--mask", str(folder / "1resnet18_ep3model_SA_best.pth.tar"), *case["args"])
            name = case["args"][1]
            got = json.loads((folder / f"{name}eval_result.json").read_text())
            cases.append({"scenario": case["scenario"], "args": case["args"], **{k: got[k] for k in CASE_KEYS},
                          "checksum": checksum(folder / f"{name}checkpoint.pth.tar")})
    return {"original": original, "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the checkout whose entry scripts are run")
    parser.add_argument("--out", type=Path, required=True, help="the record file (its commands are the template)")
    args = parser.parse_args()
    template = json.loads(args.out.read_text())
    kind = cpu_kind()
    print(f"recording on {kind} with {args.root}", flush=True)
    template["kinds"][kind] = record(args.root, template)
    args.out.write_text(json.dumps(template, indent=1) + "\n")
    print(f"wrote {args.out}: {len(template['kinds'])} CPU kind(s)")


if __name__ == "__main__":
    main()
