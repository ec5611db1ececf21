"""Fuzz the record loader: mutate a small valid v2 record many ways and load each mutant the way every defense
does (options, record, clean data, model, clean subset, test sets) up to its first evaluation.

    python sh/fuzz_records.py                      # 2,000 mutants, seed 0, the table at the end
    python sh/fuzz_records.py --cases 200 --seed 3 --families pickle_payload labels

Each mutant runs in a forked child with a time limit and a memory cap, and is classified:
- ok: loaded, and what it loaded (weights, poisoned test set, first evaluation) equals the unmutated record's
  (a mutation that changed nothing that matters, e.g. a flipped byte of zip padding);
- clean error: exit 2 with one `error:` line (at most 300 characters after `error: `);
- accepted garbage: loaded, but what it loaded differs from the original, for a mutation that makes it wrong;
- traceback: any other exit; hang: past the time limit (or the memory cap);
- code executed: a payload in the file ran (it would have created a marker file).
The target is 0 of the last four. Exit status 1 when any case falls into them.
"""
import argparse
import hashlib
import io
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter, OrderedDict
from pathlib import Path

if __package__ in (None, ""):  # run as `python sh/fuzz_records.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from utils.defense_setup import defense_parser, parse_defense_args, prepare_defense
from utils.errors import MESSAGE_LIMIT, UserError, run_cli
from utils.records import load_record_pickle
from utils.synthetic import write_synthetic_cifar10, write_tiny_record
from utils.training import evaluate

OUTCOMES = ("ok", "clean error", "accepted garbage", "traceback", "hang", "code executed")
FAILURES = OUTCOMES[2:]
RECORD = "fuzz"
MARKER = "CODE_RAN"


# ---------------------------------------------------------------- loading a case (in the child)

def load_and_digest(record_dir, data_dir):
    """Load record_dir/fuzz as a defense does, evaluate once; a digest of everything loaded and measured."""
    args = parse_defense_args(defense_parser("fuzz"), [
        "--result_file", RECORD, "--record_dir", str(record_dir), "--dataset", "cifar10", "--dataset_path",
        str(data_dir), "--device", "cpu", "--ratio", "0.1", "--amp", "false", "--progress", "false"])
    setup = prepare_defense(args)
    for side in ("info.pickle", "train_poison_index_list.pickle"):  # the API path: a record's side pickles
        load_record_pickle(setup.record.folder, side)
    metrics = evaluate(setup.model, setup.eval_sets, 64)
    digest = hashlib.sha256()
    for key, value in setup.model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    bd = setup.eval_sets.bd_test
    for tensor in (bd.images, bd.labels, bd.extra["original"]):
        digest.update(tensor.cpu().numpy().tobytes())
    digest.update(repr(sorted(metrics.items())).encode())
    return digest.hexdigest()


def run_child(case_dir, data_dir, memory_bytes):
    """In a forked child: cap memory, load, print the digest; UserError -> exit 2 as every script does."""
    torch.set_num_threads(1)
    with open("/proc/self/statm") as handle:
        mapped = int(handle.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_bytes, mapped + memory_bytes))
    os.chdir(case_dir)  # a payload's marker lands here

    def main(_argv):
        print("DIGEST", load_and_digest(case_dir / "record", data_dir))
        return 0
    return run_cli(main)


def run_case(case_dir, data_dir, timeout, memory_bytes):
    """(exit status or 'hang', stdout, stderr) of one case in a forked child."""
    out_path, err_path = case_dir / "stdout.txt", case_dir / "stderr.txt"
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            with open(out_path, "w") as out, open(err_path, "w") as err:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
                sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
                try:
                    code = run_child(case_dir, data_dir, memory_bytes)
                except SystemExit as stop:
                    code = stop.code if isinstance(stop.code, int) else 1
                except BaseException:  # noqa: BLE001 - a traceback is what is being counted
                    import traceback
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hang", "", ""
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(status)
    read = lambda path: path.read_text(errors="replace") if path.exists() else ""  # noqa: E731
    return code, read(out_path), read(err_path)


def classify(code, stdout, stderr, case_dir, baseline, expect):
    if (case_dir / MARKER).exists() or MARKER in stdout or MARKER in stderr:
        return "code executed"
    if code == "hang":
        return "hang"
    if code == -signal.SIGKILL or "MemoryError" in stderr:
        return "hang"
    if code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        one = len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) <= 7 + MESSAGE_LIMIT
        return "clean error" if one else "traceback"
    if code == 0:
        digest = next((line.split()[1] for line in stdout.splitlines() if line.startswith("DIGEST ")), None)
        if expect == "valid" or digest == baseline:
            return "ok"
        return "accepted garbage"
    return "traceback"


# ---------------------------------------------------------------- building mutants

class Payload:
    """Unpickling this runs os.system, which creates the marker file in the working directory."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


class ScriptedPayload(torch.nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) prints the marker."""

    def __init__(self):
        super().__init__()
        self.weight = torch.zeros(1)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> list[torch.Tensor]:
        return [self.weight]

    @torch.jit.export
    def __setstate__(self, state: list[torch.Tensor]) -> None:
        self.weight = state[0]
        self.training = False
        print("CODE_RAN")


def shared_bomb(depth):
    """A list that stands for 10**depth leaves when walked, but pickles as `depth` small lists."""
    node = [0]
    for _ in range(depth):
        node = [node] * 10
    return node


def corrupt_central_extra(data):
    """A zip whose first central-directory entry claims an extra field of 100 bytes it does not have."""
    eocd = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", data[eocd + 12:eocd + 20])
    name_length, extra_length = struct.unpack("<HH", data[cd_offset + 28:cd_offset + 32])
    at = cd_offset + 46 + name_length + extra_length
    out = bytearray(data[:at] + struct.pack("<HH", 0xCAFE, 100) + data[at:])
    struct.pack_into("<H", out, cd_offset + 30, extra_length + 4)
    struct.pack_into("<I", out, eocd + 4 + 12, cd_size + 4)
    zip64_end = out.rfind(b"PK\x06\x06", 0, eocd + 4)
    if zip64_end >= 0:
        struct.pack_into("<Q", out, zip64_end + 40, cd_size + 4)
    return bytes(out)


class Mutant:
    """One case's folder and the helpers a mutation needs."""

    def __init__(self, folder, rng):
        self.folder, self.rng = folder, rng
        self.result = folder / "record" / RECORD / "attack_result.pt"
        self.record = folder / "record" / RECORD

    def raw(self):
        return torch.load(self.result, weights_only=False)

    def save(self, raw, **options):
        torch.save(raw, self.result, **options)

    def entries(self, raw, split="bd_test"):
        return raw[split]["bd_data_container"]["data_dict"]

    def png(self, split="bd_test"):
        return self.rng.choice(sorted((self.record / f"{split}_dataset").glob("*/*.png")))


def _family(name, expect="wrong"):
    def mark(function):
        function.family, function.expect = name, expect
        return function
    return mark


@_family("bytes", "same")
def flip_byte(m):
    data = bytearray(m.result.read_bytes())
    at = m.rng.randrange(len(data))
    data[at] ^= 1 << m.rng.randrange(8)
    m.result.write_bytes(bytes(data))
    return f"bit flip at byte {at}"


@_family("bytes", "same")
def truncate(m):
    data = m.result.read_bytes()
    keep = m.rng.randrange(len(data))
    m.result.write_bytes(data[:keep])
    return f"truncated to {keep} bytes"


@_family("bytes", "same")
def garbage_file(m):
    m.result.write_bytes(bytes(m.rng.randrange(256) for _ in range(m.rng.choice([0, 1, 10, 4096]))))
    return "random bytes"


@_family("zip", "same")
def zip_structure(m):
    data = bytearray(m.result.read_bytes())
    kind = m.rng.choice(["central_extra", "local_size", "central_size", "eocd_count", "duplicate_name"])
    if kind == "central_extra":
        m.result.write_bytes(corrupt_central_extra(bytes(data)))
        return "central-directory extra field that claims 100 missing bytes"
    if kind == "eocd_count":
        eocd = data.rfind(b"PK\x05\x06")
        struct.pack_into("<H", data, eocd + 10, m.rng.randrange(65536))
    else:
        marker = b"PK\x03\x04" if kind == "local_size" else b"PK\x01\x02"
        spots = [i for i in range(len(data)) if data.startswith(marker, i)] if len(data) < 1 << 22 else []
        if not spots:
            return zip_structure(m)
        at = m.rng.choice(spots)
        if kind == "duplicate_name":
            name_length = struct.unpack("<H", data[at + 26:at + 28])[0] if marker == b"PK\x03\x04" else 0
            if name_length:
                data[at + 30 + name_length - 1] ^= 1
        else:
            offset = 18 if marker == b"PK\x03\x04" else 20
            struct.pack_into("<I", data, at + offset, m.rng.randrange(1 << 32))
    m.result.write_bytes(bytes(data))
    return f"zip {kind}"


@_family("torchscript")
def torchscript(m):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(ScriptedPayload()), buffer)
    data = buffer.getvalue()
    corrupt = m.rng.random() < 0.5
    m.result.write_bytes(corrupt_central_extra(data) if corrupt else data)
    return "TorchScript archive" + (" with a malformed central directory" if corrupt else "")


@_family("pickle_payload")
def pickle_payload(m):
    raw = m.raw()
    where = m.rng.choice(["top", "field", "weight", "data_dict", "other_info", "indicator", "info", "legacy",
                          "side_pickle"])
    if where == "top":
        raw = Payload()
    elif where == "field":
        raw[m.rng.choice(["model_name", "num_classes", "img_size", "clean_data", "data_path"])] = Payload()
    elif where == "weight":
        raw["model"][m.rng.choice(list(raw["model"]))] = Payload()
    elif where == "data_dict":
        entries = m.entries(raw)
        entries[m.rng.choice(list(entries))] = Payload()
    elif where == "other_info":
        entries = m.entries(raw)
        entries[m.rng.choice(list(entries))]["other_info"][0] = Payload()
    elif where == "indicator":
        raw["bd_test"]["poison_indicator"] = Payload()
    elif where == "info":
        raw["extra_info"] = {"nested": [Payload()]}
    elif where == "legacy":  # torch's pre-zip format goes through the same unpickler
        raw["model_name"] = Payload()
    if where == "side_pickle":
        torch.save(Payload(), m.record / m.rng.choice(["info.pickle", "train_poison_index_list.pickle"]))
    m.save(raw, **({"_use_new_zipfile_serialization": False} if where == "legacy" else {}))
    return f"os.system payload in {where}"


@_family("values")
def field_values(m):
    raw = m.raw()
    field, value = m.rng.choice([
        ("num_classes", -1), ("num_classes", 0), ("num_classes", 2 ** 40), ("num_classes", float("inf")),
        ("num_classes", 10.5), ("num_classes", "10"), ("num_classes", True), ("num_classes", 100),
        ("num_classes", None), ("model_name", ["airbench_cpu"]), ("model_name", "x" * 100000),
        ("model_name", "preactresnet18"), ("model_name", 7), ("model_name", "no_such_model"),
        ("img_size", (16, 16, 3)), ("img_size", (32, 32)), ("img_size", "32"), ("img_size", (32, -1, 3)),
        ("img_size", (2 ** 40, 32, 3)), ("clean_data", "cifar100"), ("clean_data", ["cifar10"]),
        ("clean_data", "../../etc"), ("data_path", 3), ("model", [1, 2]), ("model", None), ("bd_test", None),
        ("bd_test", [1]), ("bd_train", "x"), ("save_file_format", None)])
    if field == "save_file_format":
        raw["bd_test"]["bd_data_container"]["save_file_format"] = m.rng.choice(["x" * 5000, 3, "/../x", ""])
    else:
        raw[field] = value
    m.save(raw)
    return f"{field} = {str(value)[:40]}"


@_family("tensors")
def tensors(m):
    raw = m.raw()
    weights = raw["model"]
    key = m.rng.choice([k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1])
    kind = m.rng.choice(["nan", "inf", "int", "half", "bool", "double", "list", "shape", "missing", "extra",
                         "stride0", "scalar_string"])
    if kind in ("nan", "inf"):
        flat = weights[key].view(-1)
        flat[m.rng.randrange(flat.numel())] = float("nan") if kind == "nan" else float("inf")
    elif kind in ("int", "half", "bool", "double"):
        weights[key] = weights[key].to({"int": torch.int64, "half": torch.float16, "bool": torch.bool,
                                        "double": torch.float64}[kind])
    elif kind == "list":
        weights[key] = weights[key].tolist()
    elif kind == "shape":
        weights[key] = weights[key].reshape(-1)[:-1].clone()
    elif kind == "missing":
        del weights[key]
    elif kind == "extra":
        weights["extra.weight"] = torch.zeros(3)
    elif kind == "stride0":
        weights[key] = torch.zeros(1).expand(1 << 32)
    elif kind == "scalar_string":
        weights[key] = "weights"
    m.save(raw)
    return f"weight {key}: {kind}"


@_family("labels")
def labels(m):
    raw = m.raw()
    entries = m.entries(raw)
    key = m.rng.choice(list(entries))
    kind = m.rng.choice(["bd_high", "bd_negative", "bd_ignore_index", "original_high", "original_wrong",
                         "int_and_str_key", "index_outside", "negative_index", "label_float", "label_bool",
                         "label_text", "other_info_short", "data_dict_bytes", "data_dict_list"])
    entry = entries[key]
    if kind == "bd_high":
        entry["other_info"][0] = m.rng.choice([10, 11, 1000, 2 ** 40])
    elif kind == "bd_negative":
        entry["other_info"][0] = m.rng.choice([-1, -2])
    elif kind == "bd_ignore_index":
        entry["other_info"][0] = -100
    elif kind == "original_high":
        entry["other_info"][1] = 10
    elif kind == "original_wrong":
        entry["other_info"][1] = (entry["other_info"][1] + 1) % 10
    elif kind == "int_and_str_key":
        entries[str(int(key))] = dict(entry)
    elif kind == "index_outside":
        entries[10 ** 6] = entries.pop(key)
    elif kind == "negative_index":
        entries[-1 - m.rng.randrange(5)] = entries.pop(key)
    elif kind == "label_float":
        entry["other_info"][0] = 0.5
    elif kind == "label_bool":
        entry["other_info"][0] = True
    elif kind == "label_text":
        entry["other_info"][0] = "0"
    elif kind == "other_info_short":
        entry["other_info"] = [0]
    elif kind == "data_dict_bytes":
        raw["bd_test"]["bd_data_container"]["data_dict"] = b"data"
    elif kind == "data_dict_list":
        raw["bd_test"]["bd_data_container"]["data_dict"] = [entry]
    m.save(raw)
    return f"labels: {kind}"


@_family("paths")
def paths(m):
    png = m.png()
    kind = m.rng.choice(["missing_png", "absolute_outside", "dotdot_outside", "symlink_out", "symlink_dir_out",
                         "png_is_folder"])
    outside = m.folder / "outside.png"  # other pixels: reading it would change what is loaded
    Image.fromarray(255 - np.asarray(Image.open(png))).save(outside)
    raw = m.raw()
    entries = m.entries(raw)
    index = int(png.stem)
    key = next(k for k in entries if int(k) == index)
    if kind == "missing_png":
        png.unlink()
    elif kind == "absolute_outside":
        png.unlink()
        entries[key]["path"] = str(outside)
    elif kind == "dotdot_outside":
        png.unlink()
        entries[key]["path"] = "../../outside.png"
    elif kind == "symlink_out":
        png.unlink()
        png.symlink_to(outside)
    elif kind == "symlink_dir_out":
        elsewhere = m.folder / "elsewhere"
        shutil.copytree(png.parent, elsewhere)
        shutil.copy(outside, elsewhere / png.name)
        shutil.rmtree(png.parent)
        png.parent.symlink_to(elsewhere)
    elif kind == "png_is_folder":
        png.unlink()
        png.mkdir()
    m.save(raw)
    return f"paths: {kind}"


def _write_image(path, array, mode=None, format_="PNG"):
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path, format=format_)


def _bomb_png(width, height):
    """A valid PNG header (IHDR) that announces width x height pixels, with one tiny IDAT."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


@_family("png")
def png_geometry(m):
    png = m.png()
    pixels = np.asarray(Image.open(png))
    kind = m.rng.choice(["grey", "rgba", "palette", "16bit", "small", "large", "bomb", "jpeg", "webp", "truncated",
                         "random_bytes", "empty", "crc"])
    if kind == "grey":
        _write_image(png, pixels, "L")
    elif kind == "rgba":
        _write_image(png, pixels, "RGBA")
    elif kind == "palette":
        _write_image(png, pixels, "P")
    elif kind == "16bit":
        Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(png, format="PNG")
    elif kind == "small":
        _write_image(png, pixels[:16, :16])
    elif kind == "large":
        _write_image(png, np.tile(pixels, (2, 2, 1)))
    elif kind == "bomb":
        png.write_bytes(_bomb_png(100000, 100000))
    elif kind in ("jpeg", "webp"):
        try:
            _write_image(png, pixels, format_=kind.upper())
        except (OSError, KeyError):
            _write_image(png, pixels, format_="JPEG")
    elif kind == "truncated":
        data = png.read_bytes()
        png.write_bytes(data[:m.rng.randrange(8, len(data))])
    elif kind == "random_bytes":
        png.write_bytes(bytes(m.rng.randrange(256) for _ in range(200)))
    elif kind == "empty":
        png.write_bytes(b"")
    elif kind == "crc":
        data = bytearray(png.read_bytes())
        idat = data.find(b"IDAT")
        data[idat + 8 + m.rng.randrange(4)] ^= 0x10
        png.write_bytes(bytes(data))
        return "png: a changed byte in IDAT"
    return f"png: {kind}"


@_family("bombs")
def reference_bombs(m):
    raw = m.raw()
    where = m.rng.choice(["bd_test.poison_indicator", "model_name", "data_path", "clean_data", "save_file_format",
                          "data_dict", "other_info", "extra", "img_size"])
    bomb = shared_bomb(m.rng.choice([7, 9, 12]))
    if where == "bd_test.poison_indicator":
        raw["bd_test"]["poison_indicator"] = bomb
    elif where == "save_file_format":
        raw["bd_test"]["bd_data_container"]["save_file_format"] = bomb
    elif where == "data_dict":
        raw["bd_test"]["bd_data_container"]["data_dict"]["bomb"] = bomb
    elif where == "other_info":
        entries = m.entries(raw)
        entries[m.rng.choice(list(entries))]["other_info"] = bomb
    elif where == "extra":
        raw["extra"] = bomb
    else:
        raw[where] = bomb
    m.save(raw)
    return f"shared-reference bomb in {where}"


@_family("benign", "valid")
def benign(m):
    """Changes a valid record may have: the loader must accept them (ok) or refuse them cleanly."""
    raw = m.raw()
    kind = m.rng.choice(["str_keys", "int_keys", "no_poison_indicator", "absolute_data_path", "module_prefix",
                         "v2_0_absolute_paths", "unused_extra_field"])
    if kind == "str_keys":
        for split in ("bd_train", "bd_test"):
            entries = m.entries(raw, split)
            raw[split]["bd_data_container"]["data_dict"] = {str(int(k)): v for k, v in entries.items()}
    elif kind == "int_keys":
        for split in ("bd_train", "bd_test"):
            entries = m.entries(raw, split)
            raw[split]["bd_data_container"]["data_dict"] = {int(k): v for k, v in entries.items()}
    elif kind == "no_poison_indicator":
        raw["bd_test"].pop("poison_indicator", None)
    elif kind == "absolute_data_path":
        raw["data_path"] = "/home/someone/BackdoorBench/data/cifar10"
    elif kind == "module_prefix":
        raw["model"] = OrderedDict((f"module.{k}", v) for k, v in raw["model"].items())
    elif kind == "v2_0_absolute_paths":
        for entry in m.entries(raw).values():
            entry["path"] = "/home/someone/BackdoorBench/" + entry["path"].lstrip("./")
    elif kind == "unused_extra_field":
        raw["attack_note"] = {"made_by": "fuzzer", "values": [1, 2.5, "x"]}
    m.save(raw)
    return f"benign: {kind}"


MUTATIONS = [flip_byte, truncate, garbage_file, zip_structure, torchscript, pickle_payload, field_values, tensors,
             labels, paths, png_geometry, reference_bombs, benign]
FAMILIES = sorted({mutation.family for mutation in MUTATIONS})


def fuzz(cases, seed, families=None, timeout=20.0, memory_mib=3072, workdir=None, echo=print):
    """Run `cases` mutants; returns (Counter per family and outcome, list of (family, what, outcome) failures)."""
    rng = random.Random(seed)
    chosen = [m for m in MUTATIONS if families is None or m.family in families]
    if not chosen:
        raise UserError(f"no mutation family among {families}; families: {', '.join(FAMILIES)}")
    root = Path(tempfile.mkdtemp(prefix="fuzz-records-", dir=workdir))
    try:
        data_dir = root / "data"
        cifar10 = write_synthetic_cifar10(data_dir / "cifar10", train_per_batch=20, test_count=60, seed=seed)
        base = root / "base"
        write_tiny_record(base / "record", RECORD, cifar10, bd_test_count=12)
        baseline_code, out, err = run_case(base, data_dir, timeout * 3, memory_mib << 20)
        if baseline_code != 0:
            raise UserError(f"the unmutated record does not load: {err.strip()[-300:] or out.strip()[-300:]}")
        baseline = next(line.split()[1] for line in out.splitlines() if line.startswith("DIGEST "))
        counts, failures = Counter(), []
        started = time.perf_counter()
        for number in range(cases):
            mutation = chosen[number % len(chosen)] if number < len(chosen) else rng.choice(chosen)
            case = root / f"case{number}"
            shutil.copytree(base, case, symlinks=True)
            mutant = Mutant(case, random.Random(rng.random()))
            try:
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    what = mutation(mutant)
            except Exception as err:  # noqa: BLE001 - a mutation that cannot be built is skipped, not counted
                echo(f"  (case {number}: {mutation.__name__} could not be built: {err})")
                shutil.rmtree(case, ignore_errors=True)
                continue
            code, out, err = run_case(case, data_dir, timeout, memory_mib << 20)
            outcome = classify(code, out, err, case, baseline, mutation.expect)
            counts[mutation.family, outcome] += 1
            if outcome in FAILURES:
                failures.append((mutation.family, what, outcome, (err.strip().splitlines() or [""])[-1][:300]))
            shutil.rmtree(case, ignore_errors=True)
            if (number + 1) % 100 == 0:
                echo(f"  {number + 1}/{cases} cases, {time.perf_counter() - started:.0f} s")
        return counts, failures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(counts):
    """Markdown: one row per family, one column per outcome, and the total."""
    families = sorted({family for family, _ in counts})
    lines = ["| family | " + " | ".join(OUTCOMES) + " | cases |", "|---|" + "---:|" * (len(OUTCOMES) + 1)]
    for family in families + ["total"]:
        row = [sum(n for (f, o), n in counts.items() if o == outcome and family in (f, "total"))
               for outcome in OUTCOMES]
        lines.append(f"| {family} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="how many mutants")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutations and the base record")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, help="only these mutation families")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    parser.add_argument("--memory_mib", type=int, default=3072, help="memory a case may add before it counts as a hang")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    counts, failures = fuzz(args.cases, args.seed, args.families, args.timeout, args.memory_mib)
    print(table(counts))
    for family, what, outcome, last_line in failures[:40]:
        print(f"{outcome}: [{family}] {what}: {last_line}")
    total = sum(counts.values())
    bad = sum(n for (_, outcome), n in counts.items() if outcome in FAILURES)
    print(f"{total} cases in {time.perf_counter() - started:.0f} s, seed {args.seed}: {bad} in "
          f"{', '.join(FAILURES)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
