"""A real Prometheus server (the Debian ``prometheus`` binary) scraping a local vLLM server, for tests and the
dashboard picture."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType

from textscythe_dev.server import free_port


class PrometheusServer:
    def __init__(self, target: str, *, scrape_interval: str = "1s", binary: str | None = None) -> None:
        self.binary = binary or shutil.which("prometheus") or "/usr/bin/prometheus"
        self.target = target  # host:port of the vLLM server
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="textscythe-prometheus-"))
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {self.scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: vllm\n"
            "    metrics_path: /metrics\n"
            f"    static_configs: [{{targets: ['{self.target}']}}]\n"
        )
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(self.workdir / "prometheus.log", "wb"), stderr=subprocess.STDOUT,
        )
        # Ready is not enough: target discovery reaches the scrape loop up to ~5 s later. Wait for a scrape.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.value('up{job="vllm"}') == 1.0:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError((self.workdir / "prometheus.log").read_text(errors="replace")[-3000:])

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def query(self, expression: str) -> list[dict]:
        """Instant query through the HTTP API: the ``result`` list (raises on a PromQL error)."""
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = json.load(response)
        if payload.get("status") != "success":
            raise RuntimeError(f"{expression}: {payload}")
        return payload["data"]["result"]

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expression: str, expected: float, timeout: float = 60.0) -> float | None:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.value(expression)
            if value is not None and abs(value - expected) < 1e-6:
                return value
            time.sleep(1.0)
        return value
