"""Issue 19: which survivor policy keeps the original? Measured on `neardup eval build` sets.

For each set: gallery and queries indexed together (as `eval run`'s dups), groups at the default
threshold, and for every group holding an original, the member each policy would keep. Names and times
carry no signal here: every file is copied to a random name in one folder with one mtime, so only the
pixels, the bytes and the vectors decide.

    python benchmarks/survivor_experiment.py /tmp/evalsets/seed1 [/tmp/evalsets/seed2 ...]

Prints, per set and policy, the fraction of groups whose survivor is the original, and which edit kinds
the misses were.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from neardup import actions
from neardup.index import DEFAULT_THRESHOLD, Index
from neardup.store import Store

POLICIES = {
    "pixels,size,oldest (old default)": ("pixels", "size", "oldest"),
    "size": ("size",),
    "central": ("central",),
    "shape,central": ("shape", "central"),
    "shape,central,pixels,size,oldest (default)": actions.DEFAULT_KEEP,
}


def main(sets: list[str]) -> None:
    for folder in sets:
        folder = Path(folder)
        truth = json.loads((folder / "truth.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "set"
            work.mkdir()
            rng = random.Random(0)
            renamed = {}
            for entry in truth["gallery"] + truth["queries"]:  # one folder, random names, one mtime
                path = work / f"{rng.getrandbits(64):016x}.jpg"
                shutil.copyfile(folder / entry["path"], path)
                os.utime(path, (1_600_000_000, 1_600_000_000))
                renamed[entry["path"]] = str(path)
            kind = {renamed[q["path"]]: q["edit"] for q in truth["queries"]}
            originals = {renamed[g["path"]] for g in truth["gallery"] if g["role"] == "original"}
            with Index.open(Path(tmp) / "idx", create=True) as index:
                index.add([work])
                groups = index.duplicates(DEFAULT_THRESHOLD)
                with Store.open(index.root) as store:
                    judged = collections.Counter()
                    missed: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
                    for group in groups:
                        held = [p for p in group.files if p in originals]
                        if len(held) != 1:
                            continue
                        for name, keep in POLICIES.items():
                            survivor = actions.catalogued_survivor(store, group.files, keep)
                            # a byte-identical copy of the original (the grey copy of a grey photo) is the original
                            kept = survivor.sha256 == store.record(held[0]).sha256
                            judged[name] += kept
                            if not kept:
                                missed[name][kind.get(survivor.path, "other original/distractor")] += 1
                        judged["groups"] += 1
        print(f"{folder}: {judged['groups']} groups holding one original")
        for name in POLICIES:
            print(f"  {name:<44} original kept in {judged[name] / judged['groups']:.3f}"
                  f"   kept instead: {dict(missed[name].most_common(6))}")


if __name__ == "__main__":
    main(sys.argv[1:])
