"""The server's register of device keys, by name.

A device makes its own key pair (`fedemb-device key`) and sends the server only the public key, whose
comment is the device's name. Registering it copies the key to keys/NAME.pub, registers it with the
SuperLink (which from then on admits that key and no other under that node id) and records name, node id
and the key's fingerprint in keys/registry.json, because the SuperLink itself keeps no names: `status`
shows them from here, and `fedemb deploy run` prints the server's progress lines with them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedemb.deploy.credentials import checked_node_name
from fedemb.errors import ConfigError

REGISTRY = "registry.json"
KEY_TYPE = "ecdsa-sha2-nistp384"


@dataclass(frozen=True)
class PublicKey:
    name: str
    text: str  # the OpenSSH line, "ecdsa-sha2-nistp384 AAAA... NAME"
    fingerprint: str  # SHA256:<base64>, as ssh-keygen -l prints it


def read_public_key(path: Path, name: str | None = None) -> PublicKey:
    """A device's OpenSSH public key; its name is `name`, else the key's comment, else the file's stem."""
    try:
        line = path.read_text().strip()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        raise ConfigError(f"{path}: not a readable public key file") from None
    parts = line.split()
    if len(parts) < 2 or parts[0] != KEY_TYPE:
        raise ConfigError(f"{path}: not an OpenSSH {KEY_TYPE} public key (make one with `fedemb-device key`)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ConfigError(f"{path}: the key is not valid base64") from None
    name = name or (parts[2] if len(parts) > 2 else path.name.removesuffix(".pub"))
    try:
        checked_node_name(name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return PublicKey(name, f"{parts[0]} {parts[1]} {name}\n", fingerprint)


class NodeRegistry:
    def __init__(self, keys_folder: Path):
        self.folder = keys_folder
        self.file = keys_folder / REGISTRY

    def entries(self) -> dict[str, dict]:
        if not self.file.is_file():
            return {}
        try:
            return json.loads(self.file.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{self.file} is not valid JSON: restore it or register the devices again") from None

    def names_by_node_id(self) -> dict[int, str]:
        return {int(e["node_id"]): name for name, e in self.entries().items()}

    def conflict(self, key: PublicKey) -> str | None:
        """Why `key` cannot be registered, or None; a key registered before under the same name is fine."""
        entries = self.entries()
        known = entries.get(key.name)
        if known and known["fingerprint"] != key.fingerprint:
            return f"the name {key.name} is already registered with another key ({known['fingerprint']})"
        for other, entry in entries.items():
            if other != key.name and entry["fingerprint"] == key.fingerprint:
                return f"this key is already registered as {other}"
        return None

    def registered(self, key: PublicKey) -> int | None:
        entry = self.entries().get(key.name)
        return int(entry["node_id"]) if entry and entry["fingerprint"] == key.fingerprint else None

    def add(self, key: PublicKey, node_id: int) -> Path:
        """Keep keys/NAME.pub and the registry entry (written atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = self.folder / f"{key.name}.pub"
        stored.write_text(key.text)
        entries = self.entries() | {key.name: {"node_id": str(node_id), "fingerprint": key.fingerprint}}
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, self.file)
        return stored
