"""Hub ids not in the local cache are downloaded, from a Hub served here: a small HTTP server on 127.0.0.1 that
answers the requests huggingface_hub's `snapshot_download` and `model_info` make (repository info, the file
listing, HEAD and GET of `resolve` URLs), with the headers the client reads, and no Xet headers, so the client
downloads over plain HTTP. It records every request, so the tests see what was (not) fetched."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

import distmerge
from conftest import assert_user_error, run_cli, run_console_script, write_config
from distmerge.checkpoint import Checkpoint, checkpoint_roots

COMMIT = "c0ffee" + "0" * 34
LFS_SUFFIXES = (".safetensors", ".bin", ".pth")  # stored in git LFS on the Hub: ETag is the sha256
PICKLES = {"pytorch_model.bin": b"pickle weights the client must never fetch",
           "original/consolidated.pth": b"more pickle weights"}


class FakeHub:
    """Repositories by id: their commit, refs, files and whether they are gated; and the requests received."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []

    def add(self, repo_id: str, source: Path | None = None, extra: dict[str, bytes] | None = None,
            gated: bool = False) -> None:
        files = {p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()
                 } if source else {}
        files.update(extra or {})
        files["README.md"] = b"# a model card, which a merge does not read\n"
        self.repos[repo_id] = {"refs": {"main": COMMIT, "v1": COMMIT}, "files": files, "gated": gated}

    def fetched(self) -> list[str]:
        """The files whose bytes were requested (GET of a resolve URL), as `org/name/file`."""
        fetched = []
        for method, path in self.requests:
            if method == "GET" and "/resolve/" in path:
                repo, rest = path.strip("/").split("/resolve/", 1)
                fetched.append(f"{repo}/{rest.split('/', 1)[1]}")
        return sorted(fetched)


def _entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "size": len(data),
             "path": path}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def do_HEAD(self):
            self.answer(send_body=False)

        def do_GET(self):
            self.answer(send_body=True)

        def reply(self, status: int, body: bytes = b"", headers: dict | None = None, send_body: bool = True):
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def refuse(self, code: str, send_body: bool):
            status = 401 if code == "GatedRepo" else 404
            self.reply(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code}, send_body)

        def answer(self, send_body: bool):
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            api = path.startswith("/api/models/")
            parts = path.removeprefix("/api/models/" if api else "/").split("/")
            repo = hub.repos.get("/".join(parts[:2]))
            if repo is None:
                return self.refuse("RepoNotFound", send_body)
            if repo["gated"]:
                return self.refuse("GatedRepo", send_body)
            if api and len(parts) == 2:  # model_info without a revision: the default branch
                parts += ["revision", "main"]
            kind, revision, rest = parts[2], parts[3], "/".join(parts[4:])
            commit = repo["refs"].get(revision, revision if revision == COMMIT else None)
            if commit is None:
                return self.refuse("RevisionNotFound", send_body)
            files = repo["files"]
            if api and kind == "revision":  # repo info (model_info, and snapshot_download's first call)
                info = {"id": "/".join(parts[:2]), "sha": commit, "private": False,
                        "siblings": [{"rfilename": name} for name in files]}
                return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, send_body)
            if api and kind == "tree":  # the recursive listing, one page (no Link header)
                folders = sorted({name.rsplit("/", 1)[0] for name in files if "/" in name})
                listing = [{"type": "directory", "oid": "0" * 40, "path": f} for f in folders]
                listing += [_entry(name, data) for name, data in files.items()]
                return self.reply(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, send_body)
            if not api and kind == "resolve" and rest in files:
                data, entry = files[rest], _entry(rest, files[rest])
                etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
                headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}
                if "lfs" in entry:
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
                return self.reply(200, data, headers, send_body)
            self.reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, send_body)

    return Handler


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A Hub on 127.0.0.1 that huggingface_hub talks to, and an empty cache. huggingface_hub reads HF_ENDPOINT,
    HF_HUB_CACHE and HF_HUB_OFFLINE when imported, so its constants are patched (and the variables set to match)."""
    from huggingface_hub import constants

    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    hub.endpoint, hub.cache = endpoint, tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield hub
    server.shutdown()
    server.server_close()


def serve_family(hub: FakeHub, family: dict) -> dict[str, Path]:
    """The family as acme/base, acme/expert0, ...: each with pickle weights beside its safetensors."""
    ids = {"acme/base": family["base"], **{f"acme/expert{i}": Path(p) for i, p in enumerate(family["experts"])}}
    for repo_id, source in ids.items():
        hub.add(repo_id, source, extra=PICKLES)
    return ids


def output_files(out: Path) -> dict[str, bytes]:
    """The output's files but the model card and report, which name the inputs as written in the config."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.name not in ("README.md", "merge_report.parquet")}


def assert_cache_layout(cache: Path, repo_id: str, source: Path) -> None:
    """huggingface_hub's layout: refs/main -> the commit, snapshots/<commit>/ of relative links into blobs/ holding
    exactly the source's files; and the snapshot opens as a checkpoint whose files all lie in its cache repo."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    assert (repo / "refs" / "main").read_text() == COMMIT
    snapshot = repo / "snapshots" / COMMIT
    linked = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir())
    assert linked == sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    for name in linked:
        link = snapshot / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve().parent == (repo / "blobs").resolve()
        assert link.read_bytes() == (source / name).read_bytes()
    assert checkpoint_roots(snapshot)[-1] == repo.resolve()
    ckpt = Checkpoint.open(repo_id)
    assert ckpt.path == snapshot and all(Path(f).parent == (repo / "blobs").resolve() for f in ckpt.files)


@pytest.mark.parametrize("family_name", ["family_bf16_sharded", "family_fp32_single"])
def test_a_merge_by_hub_id_downloads_what_it_reads_and_then_reads_the_cache(tmp_path, request, family_name,
                                                                             fake_hub):
    family = request.getfixturevalue(family_name)
    ids = serve_family(fake_hub, family)
    models = [{"model": repo_id, "parameters": {"density": 0.5}} for repo_id in ids if repo_id != "acme/base"]
    by_id = write_config(tmp_path / "by_id.yaml", "ties", base="acme/base", models=models)
    direct = write_config(tmp_path / "direct.yaml", "ties", family,
                          models=[{"model": str(p), "parameters": {"density": 0.5}} for p in family["experts"]])
    proc = run_cli("merge", by_id, "-o", tmp_path / "by_id", "--quiet")
    assert proc.stderr == ""  # --quiet: no progress bars either
    run_cli("merge", direct, "-o", tmp_path / "direct", "--quiet")
    assert output_files(tmp_path / "by_id") == output_files(tmp_path / "direct")

    fetched = fake_hub.fetched()
    # each model's files once: no pickle, no model card
    assert fetched == sorted(f"{repo_id}/{p.relative_to(source).as_posix()}" for repo_id, source in ids.items()
                             for p in source.rglob("*") if p.is_file())
    for repo_id, source in ids.items():
        assert_cache_layout(fake_hub.cache, repo_id, source)

    fake_hub.requests.clear()
    run_cli("merge", by_id, "-o", tmp_path / "again", "--quiet")
    assert fake_hub.requests == []  # everything from the cache, without asking the Hub
    assert output_files(tmp_path / "again") == output_files(tmp_path / "direct")


def test_the_console_script_reads_hf_endpoint_and_hf_hub_cache(tmp_path, family_fp32_single, fake_hub):
    """A new process, where huggingface_hub reads the variables when it is imported, as users run it."""
    ids = serve_family(fake_hub, family_fp32_single)
    config = write_config(tmp_path / "c.yaml", "task_arithmetic", base="acme/base",
                          models=[{"model": repo_id} for repo_id in ids if repo_id != "acme/base"])
    tested = str(Path(distmerge.__file__).resolve().parents[1])
    env = {"HF_ENDPOINT": fake_hub.endpoint, "HF_HUB_CACHE": str(fake_hub.cache), "HF_HUB_OFFLINE": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (tested, os.environ.get("PYTHONPATH")) if p)}
    run_console_script("merge", config, "-o", tmp_path / "out", "--quiet", env=env)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    for repo_id, source in ids.items():
        assert_cache_layout(fake_hub.cache, repo_id, source)


def test_plan_downloads_the_small_files_and_merge_then_the_weights(tmp_path, family_bf16_sharded, fake_hub):
    ids = serve_family(fake_hub, family_bf16_sharded)
    config = write_config(tmp_path / "c.yaml", "task_arithmetic", base="acme/base@v1",
                          models=[{"model": repo_id} for repo_id in ids if repo_id != "acme/base"])
    assert "tensors       21" in run_cli("plan", config).stdout
    assert fake_hub.fetched() and not [name for name in fake_hub.fetched() if name.endswith(".safetensors")]
    run_cli("merge", config, "-o", tmp_path / "out", "--quiet")
    shards = [name for name in fake_hub.fetched() if name.endswith(".safetensors")]
    assert len(shards) == len(set(shards)) == sum(len(list(p.glob("*.safetensors"))) for p in ids.values())
    assert (fake_hub.cache / "models--acme--base" / "refs" / "v1").read_text() == COMMIT


def test_offline_a_model_planned_but_not_downloaded_is_refused(tmp_path, family_fp32_single, fake_hub):
    serve_family(fake_hub, family_fp32_single)
    config = write_config(tmp_path / "c.yaml", "task_arithmetic", family_fp32_single, base="acme/base")
    run_cli("plan", config)
    fake_hub.requests.clear()
    proc = run_cli("merge", config, "-o", tmp_path / "out", "--offline", check=False)
    assert_user_error(proc, "'acme/base' is only partly in the Hugging Face cache", "model.safetensors",
                      "run without --offline")
    assert fake_hub.requests == []


@pytest.mark.parametrize("how", ["--offline", "HF_HUB_OFFLINE"])
def test_offline_nothing_is_downloaded(tmp_path, family_fp32_single, fake_hub, how):
    serve_family(fake_hub, family_fp32_single)
    config = write_config(tmp_path / "c.yaml", "task_arithmetic", family_fp32_single, base="acme/base")
    for command in (["merge", config, "-o", tmp_path / "out"], ["validate", config], ["plan", config]):
        args = [*command, "--offline"] if how == "--offline" else command
        proc = run_cli(*args, env={"HF_HUB_OFFLINE": "1"} if how == "HF_HUB_OFFLINE" else None, check=False)
        assert_user_error(proc, "acme/base", "Hugging Face cache", how, "hf download acme/base")
    assert fake_hub.requests == [] and not (tmp_path / "out").exists()


def test_a_repository_with_only_pickle_weights_is_refused_before_any_download(tmp_path, family_fp32_single,
                                                                              fake_hub):
    base = family_fp32_single["base"]
    fake_hub.add("acme/pickled", extra={"config.json": (base / "config.json").read_bytes(), **PICKLES})
    config = write_config(tmp_path / "c.yaml", "task_arithmetic", family_fp32_single, base="acme/pickled")
    proc = run_cli("merge", config, "-o", tmp_path / "out", check=False)
    assert_user_error(proc, "acme/pickled", "pytorch_model.bin", "pickle")
    assert fake_hub.fetched() == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("ref, fragments", [
    ("acme/nowhere", ["no repository acme/nowhere", "hf auth login"]),
    ("acme/base@v9", ["no revision 'v9'", "branch, tag or commit"]),
    ("acme/gated", ["gated", "accept its conditions", "hf auth login"]),
])
def test_a_model_the_hub_does_not_give_is_one_error_line(tmp_path, family_fp32_single, fake_hub, ref, fragments):
    serve_family(fake_hub, family_fp32_single)
    fake_hub.add("acme/gated", family_fp32_single["base"], gated=True)
    config = write_config(tmp_path / "c.yaml", "task_arithmetic", family_fp32_single, base=ref)
    assert_user_error(run_cli("merge", config, "-o", tmp_path / "out", check=False), repr(ref), *fragments)
    assert fake_hub.fetched() == [] and not (tmp_path / "out").exists()


def test_an_unreachable_hub_is_one_error_line(tmp_path, family_fp32_single, fake_hub, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{unused.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    config = write_config(tmp_path / "c.yaml", "task_arithmetic", family_fp32_single, base="acme/base")
    proc = run_cli("validate", config, check=False)
    assert_user_error(proc, "'acme/base'", "Hugging Face cache", closed, "check the network")


def test_config_errors_come_before_any_download(tmp_path, family_fp32_single, fake_hub):
    ids = serve_family(fake_hub, family_fp32_single)
    config = write_config(tmp_path / "c.yaml", "ties", base="acme/base",
                          models=[{"model": "acme/expert0", "parameters": {"densty": 0.5}}])
    assert_user_error(run_cli("merge", config, "-o", tmp_path / "out", check=False), "densty", "not a parameter")
    no_base = write_config(tmp_path / "n.yaml", "ties", base=None, models=[{"model": i} for i in ids])
    assert_user_error(run_cli("validate", no_base, check=False), "needs `base_model`")
    stages = tmp_path / "multi.yaml"  # the first stage's models are not downloaded for the last one's mistake
    stages.write_text(yaml.safe_dump_all([
        {"name": "first", "merge_method": "task_arithmetic", "base_model": "acme/base",
         "models": [{"model": "acme/expert0"}]},
        {"merge_method": "linear", "models": [{"model": "first", "parameters": {"wieght": 1.0}},
                                              {"model": "acme/expert1"}]},
    ], sort_keys=False))
    for command in (["merge", stages, "-o", tmp_path / "out"], ["validate", stages], ["plan", stages]):
        assert_user_error(run_cli(*command, check=False), "wieght", "not a parameter")
    assert fake_hub.requests == []


def test_a_local_directory_wins_over_the_hub_id_it_spells(tmp_path, family_fp32_single, fake_hub):
    serve_family(fake_hub, family_fp32_single)
    local = tmp_path / "acme" / "base"
    local.parent.mkdir()
    local.symlink_to(family_fp32_single["base"], target_is_directory=True)
    config = write_config(tmp_path / "c.yaml", "task_arithmetic", family_fp32_single, base="acme/base")
    run_cli("validate", config)
    assert fake_hub.requests == []
