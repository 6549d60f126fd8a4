"""Speed and memory benchmarks of nanoCLEAR (see README 'Speed').

    python bench.py                    # every section
    python bench.py --only degrade     # per-corruption time at 256x256 on one thread

Each section is a function returning a list of row dicts; main() prints them as a markdown table.
"""
import argparse
import statistics
import time

import torch


def bench_degrade(size: int = 256, repeats: int = 5) -> list[dict]:
    """Median milliseconds of each MMD-Bench corruption at each severity on a size x size photo-like image.

    One thread: torch.set_num_threads(1) (numpy's element-wise ops are single-threaded, and degrade.py leaves
    its matrix products to torch). One untimed warm-up call per op and severity; seed fixed per repeat."""
    import degrade

    image, threads = degrade.demo_image(size), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for kind, category in degrade.CORRUPTIONS.items():
            row = {"op": kind, "category": category}
            for name in degrade.SEVERITIES:
                degrade.degrade(image, kind, name, 0)
                times = []
                for seed in range(repeats):
                    start = time.perf_counter()
                    degrade.degrade(image, kind, name, seed)
                    times.append(time.perf_counter() - start)
                row[f"{name} ms"] = round(1000 * statistics.median(times), 1)
            rows.append(row)
        return rows
    finally:
        torch.set_num_threads(threads)


SECTIONS = {"degrade": bench_degrade}  # name -> function returning a list of row dicts


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows])


def main():
    parser = argparse.ArgumentParser(description="nanoCLEAR speed benchmarks; prints markdown tables.")
    parser.add_argument("--only", choices=list(SECTIONS), help="run one section instead of all")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            print(f"\n## {name}\n\n{markdown(section())}")


if __name__ == "__main__":
    main()
