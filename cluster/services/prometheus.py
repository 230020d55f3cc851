"""Prometheus (and promtool) from Debian's packages: scrapes what is registered in its targets
folder with rtml's one scrape job (``observability.scrape``), evaluates the rule files in its rules
folder, and sends firing alerts to the Alertmanager of ``rtml services``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from cluster.services import debian
from cluster.services.base import Service, ServiceError
from observability.scrape import scrape_job

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

    def reload(self) -> None:
        """Re-read the configuration and the rule files (after a change to ``rules_dir``)."""
        import httpx

        httpx.post(f"{self.address}/-/reload", timeout=10).raise_for_status()

    def _config(self) -> dict:
        alertmanager = f"{self.host}:{self.settings.services.alertmanager_port}"
        return {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(self.rules_dir / "*.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
            "scrape_configs": [
                {"job_name": "prometheus", "static_configs": [{"targets": [f"{self.host}:{self.port}"]}]},
                scrape_job(self.targets_dir, SCRAPE_INTERVAL),
            ],
        }
