"""The main job (`make course`): execute every chapter in order at one scale, save the executed notebooks,
record wall time per chapter, and write the results page (tools/course_report.py: every chapter's headline tables,
figures and claim verdicts, with the scale, hardware and wall time; data/results/<scale>/results.md, or nbs/results.md
with --inplace, the page the docs show).

    python tools/run_course.py --scale course            # executed copies in data/results/course/
    python tools/run_course.py --scale course --inplace  # write outputs into nbs/ (what the repo commits)
    python tools/run_course.py --only 01 02              # a subset, by number prefix
    python tools/run_course.py --scale course --fresh    # execute every chapter again, even those already done

An interrupted or failed run resumes: a chapter that this runner already executed to the end at this scale, from the
same chapter source and the same package code, is not executed again (its executed copy and recorded time stay);
the chapters after it run as usual. A chapter whose prose (markdown cells) alone changed since is not executed again
either: its executed copy takes the new prose beside the outputs it has. Chapters named with --only always run.
"""
import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError
from queue import Empty

ROOT = Path(__file__).resolve().parents[1]


def hardware() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def artifacts_built_since(root: Path, since: float) -> dict:
    """{artifact name: build seconds} of the artifacts in `root` (data/<scale>/) finished at or after `since` (a
    time.time()): what a chapter built rather than loaded. A build's manifest is written last, so its mtime is when
    the build finished."""
    built = {}
    for manifest in sorted(root.glob("*/manifest.json")):
        if manifest.stat().st_mtime >= since:
            try: built[manifest.parent.name] = float(json.loads(manifest.read_text())["build_seconds"])
            except (OSError, ValueError, KeyError): continue
    return built


def kernel_takes_keys() -> bool:
    "Whether the installed ipykernel (7.3+) runs on CurveZMQ keys, read from its metadata: importing it here would hook ipywidgets into a kernel that is not there."
    from importlib.metadata import PackageNotFoundError, version
    from packaging.version import Version
    try: return Version(version("ipykernel")) >= Version("7.3")
    except PackageNotFoundError: return False


def kernel_manager():
    """A manager for each chapter's kernel. Where jupyter_client can provision CurveZMQ keys (8.10+) and ipykernel can
    use them (7.3+), the kernel and this runner talk encrypted, and ipykernel no longer warns once per chapter that its
    traffic is plain text; otherwise (either one older) the plain local TCP kernel it always had: a client with keys
    would wait forever on a kernel that ignores them."""
    # the async manager: nbclient polls it while a cell runs, so a kernel that dies (killed, out of memory) fails its
    # chapter within a second; with the blocking manager the runner waited on the dead kernel and never returned
    from jupyter_client import AsyncKernelManager
    km = AsyncKernelManager(kernel_name="python3")
    if km.has_trait("curve_publickey") and kernel_takes_keys():
        import zmq
        km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
    return km


def poll_in_slices(get_msg, slice_s: float = 0.5):
    """`get_msg` of a kernel client's channel, waiting in slices of `slice_s` seconds up to the caller's timeout.
    Why: cells that fill Output widgets (06b's and 07's listening grids) sometimes finished only when their whole
    timeout ran out (an hour per cell here; 9 of 40 such cells in a test notebook with a 30 s timeout), the reply
    having long arrived. nbclient's Output-widget mimic sends each captured output back to the kernel on the shell
    channel while a poll waits on the same socket, and a zmq socket's "readable" signal fires once, on a change: the
    send can consume it and the poll sleeps on. A fresh poll every slice finds the waiting message (0 of 40 waited)."""
    async def get_msg_in_slices(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = slice_s if deadline is None else max(0.0, min(slice_s, deadline - time.monotonic()))
            try: return await get_msg(timeout=wait)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline: raise
    return get_msg_in_slices


class ChapterClient(NotebookClient):
    "nbclient's executor, with the kernel's shell and IOPub channels read by `poll_in_slices`."
    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        for channel in (kc.shell_channel, kc.iopub_channel):
            channel.get_msg = poll_in_slices(channel.get_msg)
        return kc


def _skip_eval_false(nb) -> list:
    "Tag the cells nbdev and Quarto leave unexecuted (`#| eval: false`: GPU-only or online-only code) so nbclient skips them too."
    skipped = []
    for cell in nb.cells:
        if cell.cell_type == "code" and any(line.replace(" ", "") == "#|eval:false" for line in cell.source.splitlines()):
            tags = cell.metadata.setdefault("tags", [])
            if "skip-execution" not in tags:
                tags.append("skip-execution")
                skipped.append(cell)
    return skipped


def source_digest(nb, package: Path | None = None) -> str:
    """A digest of what a chapter's outputs depend on that a rerun could change: its cells' sources (not their outputs
    or metadata) and, when given, the code of the package folder it imports."""
    h = hashlib.sha256()
    for cell in nb.cells:
        h.update(f"{cell.cell_type}\0{cell.source}\0".encode())
    if package is not None:
        for py in sorted(package.glob("*.py")):
            h.update(f"{py.name}\0".encode()); h.update(py.read_bytes())
    return h.hexdigest()[:20]


def done_earlier(record: dict | None, scale: str, digest: str, executed: Path) -> bool:
    """Whether a chapter needs no new run: its stored timing `record` says it ran to the end at `scale` from the
    sources with `digest`, and its executed copy is still there with those sources."""
    if not record or record.get("scale") != scale or record.get("source") != digest or not executed.exists():
        return False
    try: copy = nbformat.read(executed, as_version=4)
    except Exception: return False  # an unreadable copy is no proof of a finished run
    return source_digest(copy) == record.get("cells")


def code_sources(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def with_new_prose(record: dict | None, scale: str, nb, package: Path, executed: Path):
    """The executed copy of an earlier run with chapter `nb`'s current prose in place of the prose it ran with, or None
    when a run is needed. Only markdown may differ: the copy must be the complete run `record` describes at `scale`,
    made with the package code of now (its cells plus today's package give the record's digest) and hold exactly
    `nb`'s code cells in order; outputs never depend on markdown, so a wording fix costs no rerun."""
    if not record or record.get("scale") != scale or not executed.exists():
        return None
    try: copy = nbformat.read(executed, as_version=4)
    except Exception: return None
    if source_digest(copy) != record.get("cells") or source_digest(copy, package) != record.get("source"):
        return None
    if code_sources(copy) != code_sources(nb):
        return None
    ran = iter([cell for cell in copy.cells if cell.cell_type == "code"])
    copy.cells = [next(ran) if cell.cell_type == "code" else cell for cell in nb.cells]
    return copy


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default=os.environ.get("SPEECHLLM_SCALE", "course"), choices=["smoke", "course", "full"])
    ap.add_argument("--inplace", action="store_true", help="write the executed notebooks back into nbs/")
    ap.add_argument("--only", nargs="*", default=None, help="chapter number prefixes to run, e.g. 00 01")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    ap.add_argument("--fresh", action="store_true", help="execute every chapter, also those an earlier run finished unchanged")
    args = ap.parse_args(argv)
    os.environ["SPEECHLLM_SCALE"] = args.scale

    chapters = sorted(p for p in (root / "nbs").glob("[0-9][0-9]*_*.ipynb"))
    if args.only:
        chapters = [p for p in chapters if any(p.name.startswith(o) for o in args.only)]
    if not chapters:
        print("no chapters matched", file=sys.stderr)
        return 2
    out_dir = root / "data" / "results" / args.scale
    out_dir.mkdir(parents=True, exist_ok=True)
    from speechllm_course.core import data_root
    artifacts = data_root() / args.scale
    timings, built, failed = {}, {}, None
    sys.path.insert(0, str(ROOT / "tools"))
    from course_report import TIMINGS, forget_sources, record_timings, renew_sources, write_report
    page = root / "nbs" / "results.md" if args.inplace else out_dir / "results.md"
    stored = page.with_name(f"{page.stem}_files") / TIMINGS
    records = json.loads(stored.read_text()) if stored.exists() else {}
    package = root / "speechllm_course"
    resume = not (args.fresh or args.only)
    machine = hardware()
    print(f"running {len(chapters)} chapters at scale={args.scale} on {machine}")
    for nb_path in chapters:
        nb = nbformat.read(nb_path, as_version=4)
        cells, digest = source_digest(nb), source_digest(nb, package)
        executed = nb_path if args.inplace else out_dir / nb_path.name
        if resume and done_earlier(records.get(nb_path.stem), args.scale, digest, executed):
            r = records[nb_path.stem]
            print(f"  {nb_path.name}: done on {r.get('date', '?')} ({r.get('seconds', 0):.0f} s) from the same sources; not run again (--fresh runs it)")
            continue
        refreshed = with_new_prose(records.get(nb_path.stem), args.scale, nb, package, executed) if resume else None
        if refreshed is not None:
            tmp = executed.with_name(f".{executed.name}.tmp")
            nbformat.write(refreshed, tmp)
            os.replace(tmp, executed)
            records = renew_sources(page, nb_path.stem, dict(source=digest, cells=cells))
            r = records[nb_path.stem]
            print(f"  {nb_path.name}: done on {r.get('date', '?')} ({r.get('seconds', 0):.0f} s) from the same code; "
                  "only its prose changed since, now in the executed copy; not run again (--fresh runs it)")
            continue
        skipped = _skip_eval_false(nb)
        client = ChapterClient(nb, km=kernel_manager(), timeout=args.timeout,
                               resources={"metadata": {"path": str(nb_path.parent)}})
        t0, started = time.perf_counter(), time.time()
        print(f"  {nb_path.name} ...", end="", flush=True)
        try:
            # nbclient leaves running a kernel whose manager it was handed: cleanup_kc shuts each chapter's kernel down
            # with its chapter, or a whole course run would keep every chapter's models in memory until it ended
            client.execute(cleanup_kc=True)
        except CellExecutionError as e:
            failed = (nb_path.name, str(e).splitlines()[-1] if str(e) else repr(e))
        except DeadKernelError:
            failed = (nb_path.name, "its kernel died (killed, e.g. out of memory)")
        dt = time.perf_counter() - t0
        for cell in skipped: cell.metadata["tags"].remove("skip-execution")
        for cell in skipped:
            if not cell.metadata["tags"]: del cell.metadata["tags"]
        timings[nb_path.stem] = round(dt, 1)
        built[nb_path.stem] = artifacts_built_since(artifacts, started)
        target = nb_path if args.inplace and failed is None else out_dir / nb_path.name
        tmp = target.with_name(f".{target.name}.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, target)
        building = sum(built[nb_path.stem].values())
        print(f" {dt:7.1f} s" + (f" ({building:.0f} s building {len(built[nb_path.stem])} artifacts)" if built[nb_path.stem] else "")
              + ("  FAILED" if failed else ""))
        if failed:
            forget_sources(page, nb_path.stem)  # its executed copy now holds the failure: the next run must redo it
            break
        # recorded as each chapter finishes, so an interrupted run keeps the times of the chapters it completed
        records = record_timings(page, {nb_path.stem: timings[nb_path.stem]}, args.scale, machine, built=built,
                                 sources={nb_path.stem: dict(source=digest, cells=cells)})
    write_report(root / "nbs" if args.inplace else out_dir, page, args.scale, fallback=root / "nbs", cache=artifacts)
    print(f"results page: {page.relative_to(root)}")
    summary = dict(scale=args.scale, hardware=machine, date=time.strftime("%Y-%m-%d %H:%M"),
                   seconds=timings, total_seconds=round(sum(timings.values()), 1), built=built, failed=failed)
    tmp = out_dir / ".timings.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "timings.json")
    print(f"total {summary['total_seconds']} s; executed notebooks: "
          f"{'nbs/ (in place)' if args.inplace else out_dir.relative_to(root)}; timings: {(out_dir / 'timings.json').relative_to(root)}")
    if failed:
        print(f"FAILED in {failed[0]}: {failed[1]} (the executed notebook with the traceback is in {out_dir.relative_to(root)})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
