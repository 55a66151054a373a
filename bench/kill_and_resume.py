"""Kill a real run with SIGKILL mid-training, resume it, and compare with the uninterrupted run.

    python bench/kill_and_resume.py --model=GlobalPEFT --peft_type=iisan --epochs=4 --kill_after=1 [--key=value ...]
    python bench/kill_and_resume.py --model=PerPEFT --peft_type=iisan --stage1_epochs=2 --stage2_epochs=3 \\
        --kill_after=0 --stage=2

Runs the command three times in bench/results/kill_and_resume/: uninterrupted; then killed (SIGKILL) as
soon as the ``-last`` checkpoint of the watched stage records epoch ``--kill_after`` done (so inside the
next epoch); then resumed from that run's best checkpoint. Prints both runs' best validation and test
results and whether they are identical. Posters default to ../shared/datasets/ml-100k-posters/images
on ml-100k when that folder exists."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POSTERS = ROOT.parent / "shared" / "datasets" / "ml-100k-posters" / "images"

from tests.tiny import finish, interrupt_after, start  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="GlobalPEFT")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--kill_after", type=int, default=1, help="kill once this epoch is done")
    parser.add_argument("--stage", type=int, default=None, help="two-stage models: the stage to kill in")
    args, rest = parser.parse_known_args()
    out = ROOT / "bench" / "results" / "kill_and_resume"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = [f"--model={args.model}", f"--dataset={args.dataset}", "--show_progress=False", *rest]
    if args.dataset == "ml-100k" and POSTERS.is_dir() and not any(a.startswith("--image_dir") for a in rest):
        common.append(f"--image_dir={POSTERS}")
    pattern = f"{args.model}-*-last.pth" if args.stage is None else f"{args.model}-stage{args.stage}-*-last.pth"

    def run(name: str, extra=(), kill=False):
        argv = [*common, f"--checkpoint_dir={out / name}", f"--result_file={out / name}.json", *extra]
        proc = start(argv, ROOT, out / f"{name}.log")
        if kill:
            interrupt_after(proc, out / name, pattern, args.kill_after, signal.SIGKILL)
        done = finish(proc)
        print(f"{name}: exit status {done.returncode} (log: {out / name}.log)", flush=True)
        return argv

    run("uninterrupted")
    argv = run("killed", kill=True)
    best = str(next((out / "killed").glob(pattern))).replace("-last.pth", ".pth")
    done = finish(start([*argv, f"--resume={best}"], ROOT, out / "resumed.log"))
    print(f"resumed from {best}: exit status {done.returncode}")

    plain = json.loads((out / "uninterrupted.json").read_text())
    resumed = json.loads((out / "killed.json").read_text())
    for key in ("best_valid_result", "test_result"):
        print(f"{key}\n  uninterrupted: {plain[key]}\n  killed+resumed: {resumed[key]}")
    same = all(plain[k] == resumed[k] for k in ("best_valid_result", "test_result"))
    print(f"identical: {same}")


if __name__ == "__main__":
    main()
