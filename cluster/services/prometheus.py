"""Prometheus (and promtool) from Debian's packages, scraping targets listed in files tests can write."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from cluster.services import debian
from cluster.services.base import Service, ServiceError

SCRAPE_INTERVAL = "1s"


class Prometheus(Service):
    name = "prometheus"
    port_setting = "prometheus_port"
    address_template = "http://{host}:{port}"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "prometheus.yml"

    @property
    def targets_dir(self) -> Path:
        """Scrape targets: each ``*.json`` file here is a file_sd list, picked up without a restart."""
        return self.data_dir / "targets"

    @property
    def rules_dir(self) -> Path:
        """Alerting and recording rules: each ``*.yml`` file here, loaded at start and on ``POST /-/reload``."""
        return self.data_dir / "rules"

    def add_target(self, job: str, address: str) -> Path:
        """Have Prometheus scrape ``address`` (host:port) under ``job``; returns the file to delete to stop."""
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        target_file = self.targets_dir / f"{job}.json"
        staged = target_file.with_suffix(".tmp")
        # Written whole then renamed: Prometheus watches the folder and must never read half a file.
        staged.write_text(json.dumps([{"targets": [address], "labels": {"job": job}}]))
        staged.replace(target_file)
        return target_file

    def fetch(self) -> None:
        if shutil.which("prometheus") is None or shutil.which("promtool") is None:
            debian.install(["prometheus"])

    def command(self) -> list[str]:
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(self._config(), sort_keys=False))
        check = self.check_config()
        if check.returncode != 0:
            raise ServiceError(f"promtool rejects {self.config_file}:\n{check.stdout}{check.stderr}")
        return [
            "prometheus",
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
        ]

    def check_config(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["promtool", "check", "config", str(self.config_file)], capture_output=True, text=True)

    def answers(self) -> bool:
        import httpx

        return httpx.get(f"{self.address}/-/ready", timeout=3).status_code == 200

    def _config(self) -> dict:
        return {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(self.rules_dir / "*.yml")],
            "scrape_configs": [
                {"job_name": "prometheus", "static_configs": [{"targets": [f"{self.host}:{self.port}"]}]},
                {
                    "job_name": "rtml",
                    "file_sd_configs": [{"files": [str(self.targets_dir / "*.json")], "refresh_interval": "5s"}],
                },
            ],
        }
