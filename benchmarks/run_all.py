"""`make bench`: run every benchmark in turn (each writes its JSON under benchmarks/results/)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["forward.py", "simulate_memory.py", "reconstruction.py", "scaling.py"]

if __name__ == "__main__":
    quick = ["--quick"] if "--quick" in sys.argv else []
    failed = []
    for s in SCRIPTS:
        if not (HERE / s).exists():
            continue
        print(f"== {s}", flush=True)
        args = quick if s != "simulate_memory.py" else []
        if subprocess.call([sys.executable, str(HERE / s), *args]) != 0:
            failed.append(s)
    sys.exit(1 if failed else 0)
