"""Verifier of molecule/luks_volume: the LUKS2 header, key slots, key file, escrow and crypttab that
the role made on a loop device of the lab host, its refusals, and that no secret reached a log.

The lab host has no device-mapper, so nothing here opens the volume: `cryptsetup open
--test-passphrase` checks a key against the header only. Opening is proven by the VM scenario.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ansible.parsing.vault import VaultLib, VaultSecret

SCENARIO = Path(__file__).resolve().parents[1]
SECRETS = yaml.safe_load((SCENARIO / "vars" / "secrets.yml").read_text())
DEVICES = yaml.safe_load((SCENARIO / "vars" / "devices.yml").read_text())["molecule_luks_devices"]
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/tmp/molecule-luks_volume"))
DEVICE = DEVICES["blank"]
KEYFILE = "/etc/llmfleet/keys/models.key"
CRYPTTAB = (f"models {DEVICE} {KEYFILE} "
            "luks,discard,no-read-workqueue,no-write-workqueue,nofail,x-systemd.device-timeout=90s")


@pytest.fixture(scope="module")
def escrow(instance) -> dict:
    """This host's escrow file on the control node, decrypted with the scenario's vault password."""
    path = EPHEMERAL / "escrow" / f"{instance['instance']}.vault"
    raw = path.read_bytes()
    assert raw.startswith(b"$ANSIBLE_VAULT;"), raw[:40]
    assert path.stat().st_mode & 0o777 == 0o600
    vault = VaultLib([("default", VaultSecret(SECRETS["luks_volume_escrow_vault_password"].encode()))])
    return yaml.safe_load(vault.decrypt(raw))


@pytest.fixture(scope="module")
def dump(host) -> dict:
    result = host.run("cryptsetup luksDump --dump-json-metadata %s", DEVICE)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def playbook(name, *extra):
    """Run a playbook of this scenario against molecule's inventory, outside converge's log."""
    env = {k: v for k, v in os.environ.items() if k != "ANSIBLE_LOG_PATH"}
    argv = [shutil.which("ansible-playbook") or "ansible-playbook",
            "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(SCENARIO / name), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, env=env)


def opens_header(host, passphrase: str) -> bool:
    """Whether a passphrase unlocks a key slot (header only; no device-mapper needed)."""
    result = host.run(f"printf %s {shlex.quote(passphrase)} | cryptsetup open --test-passphrase --key-file - {DEVICE}")
    return result.rc == 0


def test_device_is_luks2_with_four_key_slots(host, dump):
    assert host.run("cryptsetup isLuks --type luks2 %s", DEVICE).rc == 0
    # key file (slot 0), the extra passphrase, the escrowed recovery passphrase, Clevis
    assert sorted(dump["keyslots"]) == ["0", "1", "2", "3"], dump["keyslots"]
    assert {slot["type"] for slot in dump["keyslots"].values()} == {"luks2"}
    assert host.run("cryptsetup luksDump %s", DEVICE).stdout.splitlines()[1].split() == ["Version:", "2"]
    assert dump["config"].get("flags", []) == [], "nothing is stored persistently in the header"


def test_clevis_binds_both_tang_servers_with_threshold_two(host, dump):
    assert [token["type"] for token in dump["tokens"].values()] == ["clevis"]
    listing = host.run("clevis luks list -d %s", DEVICE)
    assert listing.rc == 0, listing.stderr
    slot, pin, config = listing.stdout.strip().split(" ", 2)
    assert pin == "sss"
    assert json.loads(config.strip("'")) == {
        "t": 2, "pins": {"tang": [{"url": "http://127.0.0.1"}, {"url": "http://localhost"}]}}
    assert slot.rstrip(":") in dump["keyslots"]


def test_key_file_opens_the_header(host):
    result = host.run("cryptsetup open --test-passphrase --key-file %s --key-slot 0 %s", KEYFILE, DEVICE)
    assert result.rc == 0, result.stderr


def test_key_file_is_root_only(host):
    key = host.file(KEYFILE)
    assert key.is_file and key.user == "root" and key.group == "root" and key.mode == 0o400
    assert key.size == 4096
    keys_dir = host.file("/etc/llmfleet/keys")
    assert keys_dir.user == "root" and keys_dir.mode == 0o700


def test_extra_passphrase_opens_the_header(host):
    assert opens_header(host, SECRETS["molecule_luks_passphrase"])
    assert not opens_header(host, "not-the-passphrase")


def test_escrowed_recovery_passphrase_opens_the_header(host, escrow, instance):
    assert escrow["host"] == instance["instance"]
    recovery = escrow["volumes"]["models"]
    assert recovery["device"] == DEVICE
    assert len(recovery["passphrase"]) == 48
    assert opens_header(host, recovery["passphrase"])


def test_crypttab_line(host):
    lines = [line.split() for line in host.file("/etc/crypttab").content_string.splitlines()
             if line.strip() and not line.startswith("#")]
    assert [" ".join(line) for line in lines] == [CRYPTTAB]


def test_published_fact(host):
    fact = json.loads(host.file("/var/lib/llmfleet-molecule/llmfleet_luks.json").content_string)
    assert fact["device_mapper"] is False
    assert fact["volumes"] == [{
        "name": "models", "device": DEVICE, "mapper": "/dev/mapper/models", "opened": False,
        "keyfile": KEYFILE, "unlock": "keyfile", "crypttab": CRYPTTAB,
    }]


def test_open_was_skipped_with_a_message():
    log = (EPHEMERAL / "ansible.log").read_text()
    assert f"SKIPPED opening {DEVICE} as /dev/mapper/models" in log


def test_refused_devices_were_not_touched(host):
    ext4 = host.run("wipefs --no-act --json %s", DEVICES["ext4"])
    assert [sig["type"] for sig in json.loads(ext4.stdout)["signatures"]] == ["ext4"]
    assert not host.file("/etc/llmfleet/keys/refused-ext4.key").exists
    assert not host.file("/etc/llmfleet/keys/refused-tpm2.key").exists
    assert not host.file("/etc/llmfleet/keys/refused-tang.key").exists
    assert not (EPHEMERAL / "escrow-refused").exists()


def test_no_secret_in_the_play_log_or_the_journal(host, escrow):
    key = host.run("base64 -w0 %s", KEYFILE).stdout.strip()
    key_hex = host.run("od -An -tx1 -N32 %s", KEYFILE).stdout.replace(" ", "").replace("\n", "")
    secrets = {
        "extra passphrase": SECRETS["molecule_luks_passphrase"],
        "vault password": SECRETS["luks_volume_escrow_vault_password"],
        "recovery passphrase": escrow["volumes"]["models"]["passphrase"],
        "key file (base64)": key[:40],
        "key file (hex)": key_hex,
    }
    base64_secrets = {f"{name} (base64)": base64.b64encode(value.encode()).decode()[:24]
                      for name, value in list(secrets.items())[:3]}
    log = (EPHEMERAL / "ansible.log").read_text()
    journal = host.run("journalctl --no-pager -o cat").stdout
    assert journal, "the host's journal is empty: the check would prove nothing"
    for name, value in {**secrets, **base64_secrets}.items():
        assert value not in log, f"{name} in the play log"
        assert value not in journal, f"{name} in the host's journal"


def test_check_mode_after_converge_changes_nothing_and_shows_no_secret(escrow):
    result = playbook("converge.yml", "--check", "--diff")
    assert result.returncode == 0, result.stdout[-3000:]
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    changed = [line for line in output.splitlines() if line.startswith("changed:")]
    assert re.search(r"changed=0\s", output[output.rindex("PLAY RECAP"):]), changed
    for secret in (SECRETS["molecule_luks_passphrase"], SECRETS["luks_volume_escrow_vault_password"],
                   escrow["volumes"]["models"]["passphrase"]):
        assert secret not in result.stdout
