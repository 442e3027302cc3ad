"""`loraplex demo`: two tenants' adapters trained and served on this machine, end to end.

It starts `loraplex up` in the background and then acts only through the public HTTP API
with the official `openai` SDK, as users would: tenants, uploads, fine-tunes (with a live
progress bar each), promotion by an admin, and the same questions asked to the base model
and to each tenant's adapter by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from api.settings import Settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
JOB_TIMEOUT_S = 20 * 60
# The product's defaults: `method: auto` trains plain LoRA where the base fits in 16-bit,
# so what the demo trains is what it serves (docs/trainer.md, "Which method").
DEMO_HP: dict[str, object] = {}


class DemoFailed(Exception):
    """A step of the demo failed; the message says which and why."""


@dataclass
class TenantRun:
    name: str
    suffix: str
    data: Path
    key: str = ""
    file_id: str = ""
    job: Any = None
    questions: list[tuple[str | None, str, str]] = field(default_factory=list)
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _questions(path: Path, n: int) -> list[tuple[str | None, str, str]]:
    """(system prompt, question, expected answer) from the first n examples of a dataset."""
    out = []
    for line in path.read_text().splitlines()[:n]:
        messages = json.loads(line)["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        user = [m["content"] for m in messages if m["role"] == "user"][-1]
        out.append((system, user, messages[-1]["content"]))
    return out


def _normalise(text: str) -> str:
    return " ".join(text.split()).strip().lower()


class Platform:
    """`loraplex up` as a child process, stopped on exit whatever happens."""

    def __init__(self, settings: Settings, *, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        exe = Path(sys.argv[0]).with_name("loraplex")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "api.cli"]
        env = {**os.environ, "LORAPLEX_HOME": str(settings.home)}
        self.proc = subprocess.Popen(
            [*cmd, "up", "--port", str(port)],
            env=env,
            stdout=open(log, "wb"),  # noqa: SIM115 (the child keeps it open)
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoFailed(f"`loraplex up` exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise DemoFailed("`loraplex up` did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Demo:
    def __init__(
        self,
        settings: Settings,
        *,
        console: Console,
        questions: int,
        min_match: float,
        support: Path,
        code: Path,
    ) -> None:
        self.settings = settings
        self.console = console
        self.min_match = min_match
        self.out = settings.home / "demo"
        self.tenants = [
            TenantRun(
                "support-team", "support-bot", support, questions=_questions(support, questions)
            ),
            TenantRun("code-team", "code-bot", code, questions=_questions(code, questions)),
        ]
        self.admin_key = ""
        self.url = ""

    def sdk(self, key: str) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=2, timeout=300)

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(
            method,
            f"{self.url}/v1/admin{path}",
            timeout=60,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            **kw,
        )
        if r.status_code >= 400:
            raise DemoFailed(f"{method} /v1/admin{path}: {r.status_code} {r.text}")
        return r.json()

    def create_tenants(self) -> None:
        created = subprocess.run(
            [sys.executable, "-m", "api.cli", "admin", "create-key", "--admin"],
            env={**os.environ, "LORAPLEX_HOME": str(self.settings.home)},
            capture_output=True,
            text=True,
            check=True,
        )
        self.admin_key = json.loads(created.stdout)["api_key"]
        existing = {t["name"]: t for t in self.admin("GET", "/tenants")["data"]}
        for t in self.tenants:
            if t.name in existing:  # a second run: a fresh key for the existing tenant
                body = self.admin("POST", f"/tenants/{existing[t.name]['id']}/keys", json={})
            else:
                body = self.admin("POST", "/tenants", json={"name": t.name})
            t.key = body["api_key"]
        self.console.print(
            "[bold]1.[/] tenants [cyan]support-team[/] and [cyan]code-team[/] "
            "and an admin key created"
        )

    def upload(self) -> None:
        for t in self.tenants:
            client = self.sdk(t.key)
            with open(t.data, "rb") as f:
                file = client.files.create(file=(t.data.name, f), purpose="fine-tune")
            file = client.files.wait_for_processing(file.id, max_wait_seconds=120)
            if file.status != "processed":
                raise DemoFailed(f"{t.data.name} was not accepted: {file.status_details}")
            t.file_id = file.id
            examples = (file.model_extra or {}).get("stats", {}).get("examples")
            self.console.print(
                f"[bold]2.[/] {t.name}: uploaded {t.data.name} ({examples} examples) as {file.id}"
            )

    def fine_tune(self) -> None:
        for t in self.tenants:
            t.job = self.sdk(t.key).fine_tuning.jobs.create(
                model=self.settings.base_model,
                training_file=t.file_id,
                suffix=t.suffix,
                method={"type": "supervised", "supervised": {"hyperparameters": DEMO_HP}},
            )
        self.console.print("[bold]3.[/] fine-tunes started (one worker, one job at a time)")
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console) as progress:
            bars = {
                t.job.id: progress.add_task(t.suffix, total=None, info="queued")
                for t in self.tenants
            }
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while not all(
                t.job.status in ("succeeded", "failed", "cancelled") for t in self.tenants
            ):
                if time.monotonic() > deadline:
                    raise DemoFailed("fine-tuning took longer than 20 minutes")
                for t in self.tenants:
                    self._refresh(t, progress, bars[t.job.id])
                time.sleep(1)
        for t in self.tenants:
            if t.job.status != "succeeded":
                raise DemoFailed(f"{t.suffix} fine-tune {t.job.status}: {t.job.error}")

    def _refresh(self, t: TenantRun, progress: Progress, bar: Any) -> None:
        client = self.sdk(t.key)
        t.job = client.fine_tuning.jobs.retrieve(t.job.id)
        events = client.fine_tuning.jobs.list_events(t.job.id, limit=20).data
        metrics = next((e for e in events if e.type == "metrics" and e.data), None)
        if metrics is not None:
            data = metrics.data
            loss = data.get("train_loss")
            info = f"step {data['step']}/{data['total_steps']}" + (
                f"  loss {loss:.3f}" if loss is not None else ""
            )
            progress.update(bar, total=data["total_steps"], completed=data["step"], info=info)
        else:
            progress.update(bar, info=t.job.status)
        if t.job.status == "succeeded" and progress.tasks[bar].total:
            progress.update(bar, completed=progress.tasks[bar].total, info="succeeded")

    def promote(self) -> None:
        for t in self.tenants:
            tenant_id = t.job.organization_id
            adapters = self.admin("GET", "/adapters", params={"tenant_id": tenant_id})["data"]
            adapter = next(a for a in adapters if a["name"] == t.suffix)
            newest = max(v["version"] for v in adapter["versions"])
            self.admin(
                "POST",
                f"/adapters/{adapter['id']}/versions/{newest}/promote",
                json={"stage": "production", "reason": "loraplex demo"},
            )
            self.console.print(f"[bold]4.[/] admin promoted {t.suffix} v{newest} to production")

    def ask(self) -> None:
        self.console.print(
            "[bold]5.[/] asking each tenant's questions to the base model and "
            "to the tenant's adapter by name"
        )
        for t in self.tenants:
            client = self.sdk(t.key)
            for system, question, expected in t.questions:
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": question}
                ]
                answers = []
                for model in (self.settings.base_model, t.suffix):
                    reply = client.chat.completions.create(
                        model=model,
                        messages=messages,
                        temperature=0,
                        max_tokens=len(expected) // 2 + 32,
                    )
                    answers.append(reply.choices[0].message.content or "")
                t.rows.append((question, expected, answers[0], answers[1]))

    def report(self) -> bool:
        ok = True
        for t in self.tenants:
            table = Table(title=f"{t.name}: base model vs {t.suffix}", show_lines=True)
            for col in ("question", "trained answer", "base model", t.suffix):
                table.add_column(col, overflow="fold")
            adapter_hits = base_hits = 0
            for question, expected, base, tuned in t.rows:
                hit = _normalise(tuned) == _normalise(expected)
                base_hit = _normalise(base) == _normalise(expected)
                adapter_hits += hit
                base_hits += base_hit
                table.add_row(
                    question, expected, base, f"{'[green]✓[/]' if hit else '[red]✗[/]'} {tuned}"
                )
            self.console.print(table)
            n = len(t.rows)
            self.console.print(
                f"{t.suffix} reproduced {adapter_hits}/{n} trained answers; "
                f"the base model {base_hits}/{n}"
            )
            ok = ok and adapter_hits >= self.min_match * n and base_hits == 0
        return ok

    def write_keys(self) -> Path:
        """The demo's keys, for logging in to the console: readable by this user only."""
        path = self.out / "keys.json"
        keys = {"admin": self.admin_key, **{t.name: t.key for t in self.tenants}}
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(json.dumps(keys, indent=2) + "\n")
        return path

    def write_outputs(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {}
        for t in self.tenants:
            r = httpx.get(
                f"{self.url}/v1/adapters/{t.suffix}",
                timeout=60,
                headers={"Authorization": f"Bearer {t.key}"},
            )
            version = max(r.json()["versions"], key=lambda v: v["version"])
            files = httpx.get(
                f"{self.url}/v1/adapters/{t.suffix}/versions/{version['version']}/files",
                headers={"Authorization": f"Bearer {t.key}"},
                timeout=120,
            )
            with tarfile.open(fileobj=BytesIO(files.content)) as tar:
                member = tar.extractfile("loss.png") if "loss.png" in tar.getnames() else None
                if member is not None:
                    (self.out / f"{t.suffix}-loss.png").write_bytes(member.read())
            job = t.job
            summary[t.suffix] = {
                "job_id": job.id,
                "fine_tuned_model": job.fine_tuned_model,
                "train_seconds": (job.finished_at or 0) - job.created_at,
                "trained_tokens": job.trained_tokens,
                "adapter_bytes": version["size_bytes"],
                "hyperparameters": job.hyperparameters.model_dump(),
                "answers": [
                    dict(zip(("question", "expected", "base", "adapter"), row, strict=True))
                    for row in t.rows
                ],
            }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        for name, s in summary.items():
            self.console.print(
                f"[bold]6.[/] {name}: {s['train_seconds']:.0f} s, "
                f"{s['trained_tokens']} tokens, adapter "
                f"{s['adapter_bytes'] / 1e6:.1f} MB"
            )
        self.console.print(f"loss curves and summary.json in {self.out}")
        return summary


def _offer_console(console: Console, platform: Platform, *, keys: Path, keep: bool) -> None:
    """The console's URL; with `keep`, the platform serves it until Ctrl-C or SIGTERM."""
    url = f"{platform.url}/console/"
    if not keep:
        platform.stop()
        console.print(
            f"web console: {url} (stopped with the demo: `loraplex demo --keep` keeps it up; "
            f"log in with a key from {keys})"
        )
        return
    console.print(f"[bold]web console: {url}[/] (log in with a key from {keys})")
    console.print("the platform stays up: Ctrl-C stops it")
    try:
        platform.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        platform.stop()


def run_demo(
    settings: Settings,
    *,
    questions: int = 4,
    min_match: float = 0.75,
    support: Path | None = None,
    code: Path | None = None,
    keep: bool = False,
) -> int:
    """The demo; 0 when it succeeded. `keep`: the platform stays up afterwards (for the
    console) until Ctrl-C or SIGTERM."""
    console = Console()
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "demo").mkdir(exist_ok=True)
    demo = Demo(
        settings,
        console=console,
        questions=questions,
        min_match=min_match,
        support=support or EXAMPLES / "support-acme.jsonl",
        code=code or EXAMPLES / "code-quokka.jsonl",
    )
    # SIGTERM should stop the platform too, as Ctrl-C does: exit through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    platform = Platform(settings, port=_free_port(), log=settings.home / "demo" / "up.log")
    demo.url = platform.url
    step = "starting the platform"
    try:
        platform.wait_ready()
        for step, action in [  # noqa: B007 (`step` names the failure below)
            ("creating tenants", demo.create_tenants),
            ("uploading datasets", demo.upload),
            ("fine-tuning", demo.fine_tune),
            ("promoting", demo.promote),
            ("asking questions", demo.ask),
        ]:
            action()
        step = "comparing answers"
        ok = demo.report()
        step = "writing outputs"
        demo.write_outputs()
        keys = demo.write_keys()
    except Exception as e:  # every failure ends in one clear line and the platform's log
        platform.stop()
        console.print(f"[red bold]demo failed while {step}:[/] {e}")
        console.print(f"[dim]last lines of {platform.log}:[/]\n{platform.tail()}")
        return 1
    except BaseException:  # Ctrl-C, SIGTERM: stop the platform too
        platform.stop()
        raise
    if ok:
        console.print("[green bold]demo succeeded[/]")
    else:
        console.print(
            "[red bold]demo finished, but the adapters did not reproduce their "
            "training answers as expected[/]"
        )
    _offer_console(console, platform, keys=keys, keep=keep)
    return 0 if ok else 2
