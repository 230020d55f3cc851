"""Resolve Maven Central artifacts into a Java classpath, cached so that a second resolution runs nothing.

The local Maven repository lives in the download cache (``<download_cache>/maven/repository``), shared
by every clone on the machine; each resolved classpath is kept beside it, keyed by the artifacts asked for.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

from cluster.services import debian
from cluster.services.base import ServiceError

DEPENDENCY_PLUGIN_VERSION = "3.8.1"

# Concurrent Maven runs writing one local repository can leave half-written files behind.
_MAVEN = threading.Lock()


def resolve_classpath(name: str, artifacts: Sequence[str], cache_dir: Path, pinned: Sequence[str] = ()) -> list[Path]:
    """The jars of ``artifacts`` ("group:artifact:version") and everything they depend on.

    ``pinned`` forces the version of transitive dependencies (Maven's dependencyManagement).
    """
    pom = _pom(name, artifacts, pinned)
    work_dir = cache_dir / "maven" / f"{name}-{hashlib.sha256(pom.encode()).hexdigest()[:12]}"
    classpath_file = work_dir / "classpath.txt"
    with _MAVEN:
        jars = _cached(classpath_file)
        if jars is None:
            _run_maven(pom, work_dir, cache_dir / "maven" / "repository", classpath_file)
            jars = _cached(classpath_file)
    if jars is None:
        raise ServiceError(f"Maven resolved {name}, but some jars in {classpath_file} are missing.")
    return jars


def _cached(classpath_file: Path) -> list[Path] | None:
    if not classpath_file.is_file():
        return None
    jars = [Path(entry) for entry in classpath_file.read_text().strip().split(":")]
    return jars if all(jar.is_file() for jar in jars) else None


def _run_maven(pom: str, work_dir: Path, repository: Path, classpath_file: Path) -> None:
    if shutil.which("mvn") is None:
        debian.install(["maven"])
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "pom.xml").write_text(pom)
    partial = classpath_file.with_suffix(".partial")
    command = [
        "mvn", "--batch-mode", "--quiet", "--file", str(work_dir / "pom.xml"),
        f"-Dmaven.repo.local={repository}", f"-Dmdep.outputFile={partial}",
        "dependency:build-classpath",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"Maven could not resolve {work_dir.name}:\n{(result.stdout + result.stderr)[-3000:]}")
    partial.replace(classpath_file)


def _pom(name: str, artifacts: Sequence[str], pinned: Sequence[str]) -> str:
    def dependencies(coordinates: Sequence[str]) -> str:
        entries = []
        for coordinate in coordinates:
            group, artifact, version = (escape(part) for part in coordinate.split(":"))
            entries.append(
                f"<dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
                f"<version>{version}</version></dependency>"
            )
        return "<dependencies>" + "".join(entries) + "</dependencies>"

    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>rtml.services</groupId>
  <artifactId>{escape(name)}</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencyManagement>{dependencies(pinned)}</dependencyManagement>
  {dependencies(artifacts)}
  <build><pluginManagement><plugins><plugin>
    <groupId>org.apache.maven.plugins</groupId>
    <artifactId>maven-dependency-plugin</artifactId>
    <version>{DEPENDENCY_PLUGIN_VERSION}</version>
  </plugin></plugins></pluginManagement></build>
</project>
"""
