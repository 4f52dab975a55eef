"""Citation sweep: documents outside the repository -> docs/ inside it (mechanical; re-runnable after a merge).

    python scripts/sweep_citations.py      # from the repository root
"""
import re
import subprocess
from pathlib import Path

files = subprocess.run(["git", "ls-files", "gorp_ds", "launch", "bench", "tests", "README.md", "docs"],
                       capture_output=True, text=True, check=True).stdout.split()
rules = [
    (r"/work/shared/docs/GORP\.md", "docs/algorithm.md"),
    (r"\.\./shared/docs/GORP\.md", "docs/algorithm.md"),
    (r"shared/docs/MEASURE\.md", "docs/benchmarking.md"),
    (r"shared/docs/SYSTEM\.md", "docs/architecture.md"),
    (r'ids=\["GORP\.md", ', 'ids=["as-written", '),
    (r"``GORP\.md``: the spec as written", "``as-written``: docs/algorithm.md as written"),
    (r"\(a variant the code adopted; not in GORP\.md\)", "(a variant the code adopted: docs/algorithm.md §2, marked ours)"),
    (r"Not part of GORP\.md §2 as written", "An addition of ours to docs/algorithm.md §2"),
    (r"\bGORP\.md\b", "docs/algorithm.md"),
    (r"\bMEASURE\.md\b", "docs/benchmarking.md"),
    (r"\bSYSTEM\.md\b", "docs/architecture.md"),
    (r"\(e\.g\. \.\./shared/cl_benchmark\)", "(e.g. data/CL_Benchmark)"),
]
for name in files:
    path = Path(name)
    if path.name == "test_architecture.py" or not path.is_file():
        continue
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        continue
    new = text
    for pattern, repl in rules:
        new = re.sub(pattern, repl, new)
    if name.startswith("bench/"):
        new = new.replace("--data-dir ../shared/cl_benchmark", "--data-dir data/CL_Benchmark")
    if new != text:
        path.write_text(new)
        print("swept", name)
