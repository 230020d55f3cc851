"""Servers run from Maven Central artifacts under the machine's Java (Kafka, Neo4j, Elasticsearch)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from cluster.services import debian, maven
from cluster.services.base import Service, ServiceError

JAVA_SOURCES = Path(__file__).parent / "java"
# Console-only logging for the log4j2-based servers: their stdout is the service's log file.
LOG4J2_CONSOLE_CONFIG = Path(__file__).parent / "log4j2-console.properties"
JDK_PACKAGE = "openjdk-17-jdk-headless"


class JvmService(Service):
    """A Java server: its artifacts come from Maven Central, optionally with a small launcher of ours
    (a ``java/<launcher>.java`` source compiled into the data folder against those artifacts)."""

    artifacts: tuple[str, ...]
    # Versions forced on transitive dependencies (e.g. a patched log4j).
    pinned: tuple[str, ...] = ()
    launcher: str | None = None

    def fetch(self) -> None:
        if shutil.which("java") is None or shutil.which("javac") is None:
            debian.install([JDK_PACKAGE])
        classpath = self.classpath()
        if self.launcher:
            self._compile_launcher(classpath)

    def classpath(self) -> list[Path]:
        return maven.resolve_classpath(self.name, self.artifacts, self.settings.services.download_cache, self.pinned)

    def java_command(self, main_class: str, *arguments: str, system_properties: Mapping[str, str] = {}) -> list[str]:
        heap = f"{self.settings.services.jvm_heap_mb}m"
        classpath = [*([self.classes_dir] if self.launcher else []), *self.classpath()]
        # The classpath (hundreds of jars) goes in a java @argfile, keeping command lines and logs readable.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        classpath_args = self.data_dir / "classpath.args"
        classpath_args.write_text('-cp "' + ":".join(map(str, classpath)) + '"\n')
        return [
            "java",
            f"-Xms{heap}",
            f"-Xmx{heap}",
            # A server out of memory is broken: let it die (and `up` say so) rather than limp on.
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            *(f"-D{key}={value}" for key, value in system_properties.items()),
            f"@{classpath_args}",
            main_class,
            *arguments,
        ]

    @property
    def classes_dir(self) -> Path:
        return self.data_dir / "classes"

    def _compile_launcher(self, classpath: list[Path]) -> None:
        source = JAVA_SOURCES / f"{self.launcher}.java"
        compiled = self.classes_dir / f"{self.launcher}.class"
        if compiled.is_file() and compiled.stat().st_mtime >= source.stat().st_mtime:
            return
        self.classes_dir.mkdir(parents=True, exist_ok=True)
        command = ["javac", "-d", str(self.classes_dir), "-cp", ":".join(map(str, classpath)), str(source)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceError(f"Could not compile {source}:\n{result.stdout}{result.stderr}")
