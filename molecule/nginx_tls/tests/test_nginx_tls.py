"""Verifier of molecule/nginx_tls: real openssl and curl clients against the front door.

Clients run on the control node (the lab network's gateway: an address that is allow-listed for
admins, auditors and guests but not for developers) and, through testinfra, inside the host (from
127.0.0.1, which developers may use). Every HTTPS response any test receives is checked for HSTS.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

SCENARIO = Path(__file__).resolve().parents[1]
FIXTURES = yaml.safe_load((SCENARIO / "vars" / "secrets.yml").read_text())
KEYS = {item["name"]: item.get("key") for item in FIXTURES["nginx_tls_api_keys"]}
KEYS["guest-hashed"] = FIXTURES["molecule_guest_hashed_key"]
SECRETS = [value for value in KEYS.values() if value] + [
    FIXTURES["nginx_tls_ca_passphrase"],
    FIXTURES["nginx_tls_upstream_api_key"],
]
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/tmp/molecule-nginx_tls"))
PKI = EPHEMERAL / "pki"
CA = PKI / "ca.crt"
HSTS = "max-age=63072000; includeSubDomains"
HOST_CA = "/etc/llmfleet/tls/ca.crt"
CACHE_DIR = "/var/cache/llmfleet-frontdoor"
ENGINES = {name: json.loads((SCENARIO / "vars" / f"engine-{name}.json").read_text()) for name in "ab"}
ADMIN = {"key": KEYS["ops-admin"], "cert": "ops-admin"}


@pytest.fixture(scope="module")
def door(instance):
    """Name and address of the front door under test."""
    return {"name": instance["instance"], "address": instance["address"]}


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def parse_response(raw: str) -> tuple[int, dict[str, str], str]:
    head, _blank, body = raw.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _colon, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def https(door, path, key=None, cert=None, address=None, body=None, headers=()):
    """One HTTPS request from the control node, chain verified against the fleet CA; POST with a body."""
    argv = ["curl", "-sS", "-i", "--max-time", "10", "--cacert", str(CA),
            "--resolve", f"{door['name']}:443:{address or door['address']}"]
    for header in headers:
        argv += ["-H", header]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data-binary",
                 body if isinstance(body, str) else json.dumps(body)]
    if key:
        argv += ["-H", f"Authorization: Bearer {key}"]
    if cert:
        argv += ["--cert", str(PKI / "clients" / f"{cert}.crt"), "--key", str(PKI / "clients" / f"{cert}.key")]
    result = run(argv + [f"https://{door['name']}{path}"])
    assert result.returncode == 0, result.stderr
    status, headers, body = parse_response(result.stdout)
    assert headers.get("strict-transport-security") == HSTS, (path, status, headers)
    return status, headers, body


def https_in_host(host, door, path, key, via="127.0.0.1"):
    """One HTTPS request made inside the host, from `via` (the source address follows it)."""
    result = host.run(
        "curl -sS -o /dev/null -w '%%{http_code}' --max-time 10 --cacert %s --resolve %s:443:%s "
        "-H 'Authorization: Bearer %s' https://%s%s",
        HOST_CA, door["name"], via, key, door["name"], path,
    )
    assert result.rc == 0, result.stderr
    return int(result.stdout)


def handshake(door, *options):
    argv = ["openssl", "s_client", "-connect", f"{door['address']}:443", "-servername", door["name"],
            "-CAfile", str(CA), "-verify_hostname", door["name"], "-verify_return_error", *options]
    return run(argv, input="")


def playbook(name, *extra):
    """Run a playbook of this scenario against molecule's inventory, outside converge's log."""
    env = {k: v for k, v in os.environ.items() if k != "ANSIBLE_LOG_PATH"}
    argv = [shutil.which("ansible-playbook") or "ansible-playbook",
            "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(SCENARIO / name), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, env=env)


# --- TLS ----------------------------------------------------------------------------------------

def test_tls12_is_refused(door):
    result = handshake(door, "-tls1_2")
    assert result.returncode != 0
    assert "alert protocol version" in result.stderr


def test_tls13_chain_valid_for_the_host_name(door):
    result = handshake(door, "-tls1_3")
    assert result.returncode == 0, result.stderr
    assert "Verify return code: 0 (ok)" in result.stdout
    assert "TLSv1.3" in result.stdout


def test_a_wrong_host_name_does_not_verify(door):
    result = run(["openssl", "s_client", "-connect", f"{door['address']}:443", "-CAfile", str(CA),
                  "-verify_hostname", "not-" + door["name"], "-verify_return_error"], input="")
    assert result.returncode != 0


@pytest.mark.parametrize("group", ["X25519", "prime256v1", "secp384r1"])
def test_ecdhe_groups_are_offered(door, group):
    result = handshake(door, "-tls1_3", "-groups", group)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("group", ["ffdhe2048", "ffdhe4096"])
def test_finite_field_groups_are_not(door, group):
    result = handshake(door, "-tls1_3", "-groups", group)
    assert result.returncode != 0
    assert "handshake failure" in result.stderr


def test_http_redirects_to_https(door):
    result = run(["curl", "-sS", "-i", "--max-time", "10", f"http://{door['address']}/generate?x=1"])
    status, headers = parse_response(result.stdout)[:2]
    assert status == 301
    assert headers["location"] == f"https://{door['name']}/generate?x=1"


def test_server_tokens_off(door):
    headers = https(door, "/generate")[1]
    assert headers["server"] == "nginx"


# --- access matrix ------------------------------------------------------------------------------

def test_no_key_is_401_with_a_bearer_challenge(door):
    status, headers = https(door, "/generate")[:2]
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")


def test_wrong_key_is_401(door):
    assert https(door, "/generate", key="mol-not-a-key-00000000000000000000000000")[0] == 401
    assert https(door, "/generate", key=KEYS["guest"] + "x")[0] == 401


def test_guest_can_generate(door):
    time.sleep(1)
    status, _headers, body = https(door, "/generate", key=KEYS["guest"])
    assert status == 200
    assert "generate" in body


def test_guest_given_by_hash_can_generate(door):
    assert https(door, "/v1/chat/completions", key=KEYS["guest-hashed"])[0] == 200


def test_guest_burst_beyond_the_limit_is_429(door):
    time.sleep(1)
    burst = 25
    argv = ["curl", "-s", "--max-time", "20", "--cacert", str(CA), "--resolve",
            f"{door['name']}:443:{door['address']}", "-H", f"Authorization: Bearer {KEYS['guest']}",
            "-w", "%{http_code}\n"]
    argv += ["-o", "/dev/null", f"https://{door['name']}/generate"] * burst
    codes = run(argv).stdout.split()
    assert len(codes) == burst
    assert codes[0] == "200"
    assert set(codes) == {"200", "429"}
    assert codes.count("429") >= burst - 15
    status, _headers, body = https(door, "/generate", key=KEYS["guest"])
    assert status == 429
    assert "rate limit" in body
    # Another key has its own bucket.
    assert https(door, "/generate", key=KEYS["guest-hashed"])[0] == 200


@pytest.mark.parametrize("path", ["/metrics", "/info", "/health"])
def test_guest_sees_no_monitoring(door, path):
    assert https(door, path, key=KEYS["guest"])[0] == 403


@pytest.mark.parametrize("path", ["/metrics", "/info", "/health"])
def test_monitoring_is_not_public(door, path):
    assert https(door, path)[0] == 401


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/chat/completions"])
def test_auditor_cannot_generate(door, path):
    assert https(door, path, key=KEYS["audit"])[0] == 403


@pytest.mark.parametrize("path", ["/metrics", "/info", "/health"])
def test_auditor_reads_monitoring(door, path):
    assert https(door, path, key=KEYS["audit"])[0] == 200


def test_developer_from_a_non_allow_listed_address_is_403(door):
    assert https(door, "/generate", key=KEYS["dev"])[0] == 403
    assert https(door, "/metrics", key=KEYS["dev"])[0] == 403


def test_developer_from_the_allow_list_generates_and_reads_metrics(host, door):
    assert https_in_host(host, door, "/generate", KEYS["dev"]) == 200
    assert https_in_host(host, door, "/metrics", KEYS["dev"]) == 200
    # The same host through its lab address is not on the developer allow-list.
    assert https_in_host(host, door, "/generate", KEYS["dev"], via=door["address"]) == 403


def test_admin_without_client_certificate_is_refused(door):
    assert https(door, "/info", key=KEYS["ops-admin"])[0] == 403
    assert https(door, "/generate", key=KEYS["ops-admin"])[0] == 403


def test_admin_with_another_admins_certificate_is_refused(door):
    assert https(door, "/info", key=KEYS["ops-admin"], cert="backup-admin")[0] == 403


def test_a_client_certificate_alone_is_not_a_key(door):
    assert https(door, "/info", cert="ops-admin")[0] == 401


def test_admin_with_its_certificate_reaches_everything(door):
    for path in ["/info", "/metrics", "/health", "/generate"]:
        assert https(door, path, key=KEYS["ops-admin"], cert="ops-admin")[0] == 200, path
    # Paths outside the matrix are proxied for admins only (the engine answers 404 here).
    assert https(door, "/no-such-path", key=KEYS["ops-admin"], cert="ops-admin")[0] == 404
    assert https(door, "/no-such-path", key=KEYS["dev"])[0] == 403


# --- response cache -----------------------------------------------------------------------------
# The test upstream answers every POST with a new serial number: an answer with an earlier serial
# came from the front door's cache. Admin requests (key + client certificate) are not rate-limited.

def ask(door, path, body, headers=(), **caller):
    """POST `body`; returns (status, X-Cache-Status or None, upstream serial or None, body)."""
    status, headers, text = https(door, path, body=body, headers=headers, **(caller or ADMIN))
    serials = re.findall(r'"serial": ([0-9]+)', text)
    return status, headers.get("x-cache-status"), (serials[0] if serials else None), text


def prompt():
    return f"cache test {uuid.uuid4()}"


def test_identical_greedy_generate_requests_hit(door):
    text = prompt()
    first = ask(door, "/generate", {"inputs": text, "parameters": {"max_new_tokens": 8}})
    assert first[:2] == (200, "MISS"), first
    again = ask(door, "/generate", {"inputs": text, "parameters": {"max_new_tokens": 8}})
    assert again[:3] == (200, "HIT", first[2]), again
    # The same request written differently (key order, white space) is the same normalised body.
    reordered = '{ "parameters" : {"max_new_tokens": 8},\n "inputs": %s }' % json.dumps(text)
    assert ask(door, "/generate", reordered)[1:3] == ("HIT", first[2])
    # Another token budget is another request.
    other = ask(door, "/generate", {"inputs": text, "parameters": {"max_new_tokens": 9}})
    assert other[1] == "MISS" and other[2] != first[2]
    # A client asking for a fresh answer goes around the cache, and what it got is not stored.
    for header in ["Cache-Control: no-cache", "Cache-Control: max-age=0, no-store", "Pragma: no-cache"]:
        fresh = ask(door, "/generate", {"inputs": text, "parameters": {"max_new_tokens": 8}}, headers=[header])
        assert fresh[:2] == (200, None) and fresh[2] not in (first[2], other[2]), (header, fresh)
    assert ask(door, "/generate", {"inputs": text, "parameters": {"max_new_tokens": 8}})[1:3] == ("HIT", first[2])


def test_identical_temperature_zero_chat_requests_hit(door):
    body = {"model": "tgi", "messages": [{"role": "user", "content": prompt()}], "temperature": 0, "max_tokens": 8}
    first = ask(door, "/v1/chat/completions", body)
    assert first[:2] == (200, "MISS"), first
    assert ask(door, "/v1/chat/completions", body)[1:3] == ("HIT", first[2])


@pytest.mark.parametrize("path,body", [
    ("/generate", {"parameters": {"do_sample": True, "max_new_tokens": 8}}),
    ("/generate", {"parameters": {"temperature": 0.7, "max_new_tokens": 8}}),
    ("/generate", {"parameters": {"top_p": 0.9}}),
    ("/v1/chat/completions", {"temperature": 0.7}),
    ("/v1/chat/completions", {}),
    ("/v1/chat/completions", {"temperature": 0, "top_p": 0.5}),
    ("/v1/chat/completions", {"temperature": 0, "n": 2}),
], ids=["do_sample", "generate-temperature", "generate-top_p", "chat-temperature", "chat-default-temperature",
        "chat-top_p", "chat-n"])
def test_sampled_requests_are_never_cached(door, path, body):
    body = dict(body, **({"inputs": prompt()} if path == "/generate" else {"messages": [{"role": "user", "content": prompt()}]}))
    answers = [ask(door, path, body) for _round in range(2)]
    assert [answer[:2] for answer in answers] == [(200, None), (200, None)], answers
    assert answers[0][2] != answers[1][2]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"temperature": 0, "stream": True}),
    ("/generate_stream", {"parameters": {"max_new_tokens": 8}}),
])
def test_streamed_requests_are_never_cached(door, path, body):
    body = dict(body, **({"inputs": prompt()} if path == "/generate_stream" else {"messages": [{"role": "user", "content": prompt()}]}))
    answers = [ask(door, path, body) for _round in range(2)]
    for status, cache_status, _serial, text in answers:
        assert (status, cache_status) == (200, None)
        assert text.count("data: ") == 3, text
    assert answers[0][2] != answers[1][2]


def test_a_cached_answer_still_needs_the_right_key_and_role(door):
    body = {"inputs": prompt(), "parameters": {"max_new_tokens": 8}}
    cached = ask(door, "/generate", body)
    assert ask(door, "/generate", body)[1:3] == ("HIT", cached[2])
    refused = [ask(door, "/generate", body, key=None),
               ask(door, "/generate", body, key="mol-not-a-key-00000000000000000000000000"),
               ask(door, "/generate", body, key=KEYS["audit"]),
               ask(door, "/generate", body, key=KEYS["ops-admin"])]
    assert [answer[0] for answer in refused] == [401, 401, 403, 403]
    for answer in refused:
        assert answer[1] is None and answer[2] is None, answer
    # The shared cache (nginx_tls_cache_scope: shared) answers another allowed caller too.
    time.sleep(1)
    assert ask(door, "/generate", body, key=KEYS["guest"])[:3] == (200, "HIT", cached[2])


def test_cached_answers_are_www_data_only_and_hold_no_key(host):
    cache = host.file(CACHE_DIR)
    assert (cache.user, cache.mode) == ("www-data", 0o700)
    stored = host.run("find %s -type f", CACHE_DIR).stdout.split()
    assert stored
    for name, key in KEYS.items():
        if key:
            assert host.run("grep -rqF -- %s %s", key, CACHE_DIR).rc == 1, name


def engine_vars(name, **changes):
    return ["-e", json.dumps({"llmfleet_engine": dict(ENGINES[name], **changes)})]


def test_a_release_switch_never_serves_the_previous_answer(host, door):
    body = {"inputs": prompt(), "parameters": {"max_new_tokens": 8}}
    on_a = ask(door, "/generate", body)
    assert ask(door, "/generate", body)[1:3] == ("HIT", on_a[2])
    dir_a = host.run("ls %s", CACHE_DIR).stdout.split()
    try:
        switched = playbook("converge.yml", *engine_vars("b"))
        assert switched.returncode == 0, switched.stdout[-3000:]
        on_b = ask(door, "/generate", body)
        assert on_b[1] == "MISS" and on_b[2] != on_a[2], on_b
        assert ask(door, "/generate", body)[1:3] == ("HIT", on_b[2])
        # One directory per serving release: A's answers are gone, not only unreachable.
        dir_b = host.run("ls %s", CACHE_DIR).stdout.split()
        assert len(dir_a) == len(dir_b) == 1 and dir_a != dir_b

        # The same release with other engine arguments answers differently too: another release id
        # (another directory). In the same run the cache becomes per caller: keys share no answer.
        args = dict(ENGINES["b"]["engine_args"], quantize="fp8")
        requantized = playbook("converge.yml", *engine_vars("b", engine_args=args), "-e", "nginx_tls_cache_scope=caller")
        assert requantized.returncode == 0, requantized.stdout[-3000:]
        dir_b2 = host.run("ls %s", CACHE_DIR).stdout.split()
        assert len(dir_b2) == 1 and dir_b2 != dir_b
        admin = ask(door, "/generate", body)
        assert admin[1] == "MISS" and admin[2] != on_b[2]
        assert ask(door, "/generate", body)[1:3] == ("HIT", admin[2])
        time.sleep(1)
        guest = ask(door, "/generate", body, key=KEYS["guest"])
        assert guest[1] == "MISS" and guest[2] != admin[2]
        assert ask(door, "/generate", body, key=KEYS["guest"])[1:3] == ("HIT", guest[2])
        assert ask(door, "/generate", body, key=KEYS["guest-hashed"])[1] == "MISS"
    finally:
        back = playbook("converge.yml")
        assert back.returncode == 0, back.stdout[-3000:]
    # Back on A: what A answered before the switch was dropped with A's directory.
    on_a_again = ask(door, "/generate", body)
    assert on_a_again[1] == "MISS" and on_a_again[2] not in (on_a[2], on_b[2])


def test_the_cache_refuses_to_run_without_the_serving_release(host):
    before = host.file("/etc/nginx/nginx.conf").sha256sum
    result = playbook("converge.yml", "-e", json.dumps({"llmfleet_engine": {}}))
    assert result.returncode != 0
    assert "apply tgi_server earlier in the same play" in result.stdout
    assert "nginx_tls_cache_release" in result.stdout
    assert host.file("/etc/nginx/nginx.conf").sha256sum == before


# --- drain switch -------------------------------------------------------------------------------

def test_drain_then_undrain(door):
    drained = playbook("frontdoor_switch.yml", "-e", "frontdoor_switch=drain")
    assert drained.returncode == 0, drained.stdout[-3000:]
    status, _headers, body = https(door, "/health", key=KEYS["audit"])
    assert (status, body.strip()) == (503, "draining")
    # Requests keep being served while the load balancer moves away.
    assert https(door, "/v1/chat/completions", key=KEYS["guest-hashed"])[0] == 200

    undrained = playbook("frontdoor_switch.yml", "-e", "frontdoor_switch=undrain")
    assert undrained.returncode == 0, undrained.stdout[-3000:]
    assert https(door, "/health", key=KEYS["audit"])[0] == 200


def test_drain_waits_for_requests_in_flight_within_its_bound(door, tmp_path):
    body = tmp_path / "body"
    body.write_bytes(b"x" * 200_000)
    # An upload at 2 KiB/s keeps one request in flight for longer than the test needs.
    with subprocess.Popen(["curl", "-s", "-o", "/dev/null", "--limit-rate", "2k", "--max-time", "90",
                           "--cacert", str(CA), "--resolve", f"{door['name']}:443:{door['address']}",
                           "-H", f"Authorization: Bearer {KEYS['guest-hashed']}", "--data-binary", f"@{body}",
                           f"https://{door['name']}/generate"]) as slow:
        try:
            time.sleep(2)
            busy = playbook("frontdoor_switch.yml", "-e", "frontdoor_switch=drain", "-e", "nginx_tls_drain_wait_s=4")
            assert busy.returncode != 0
            assert "Wait until no request is in flight" in busy.stdout
        finally:
            slow.kill()
    idle = playbook("frontdoor_switch.yml", "-e", "frontdoor_switch=drain", "-e", "nginx_tls_drain_wait_s=20")
    assert idle.returncode == 0, idle.stdout[-3000:]
    assert https(door, "/health", key=KEYS["audit"])[0] == 503
    undrained = playbook("frontdoor_switch.yml", "-e", "frontdoor_switch=undrain")
    assert undrained.returncode == 0, undrained.stdout[-3000:]
    assert https(door, "/health", key=KEYS["audit"])[0] == 200


# --- configuration safety -----------------------------------------------------------------------

def test_check_mode_after_converge_changes_nothing_and_diff_shows_no_secret(host):
    # Runs before the broken template below (file order within the host's tests), which leaves its
    # refused candidate behind until the next converge re-renders it.
    for name in ["nginx.conf", "llmfleet/bearer.js", "llmfleet/cache.js", "llmfleet/keys.map", "llmfleet/upstream-auth.conf"]:
        live = host.file(f"/etc/nginx/{name}").sha256sum
        assert host.file(f"/etc/nginx/llmfleet-candidate/{name}").sha256sum == live, name
    result = playbook("converge.yml", "--check", "--diff")
    assert result.returncode == 0, result.stdout[-3000:]
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    changed = [line for line in output.splitlines() if line.startswith("changed:")]
    assert re.search(r"changed=0\s", output[output.rindex("PLAY RECAP"):]), changed
    for secret in SECRETS:
        assert secret not in result.stdout


def test_a_broken_template_never_replaces_the_working_config(host, door):
    before = host.file("/etc/nginx/nginx.conf").sha256sum
    result = playbook("converge.yml", "-e", f"nginx_tls_nginx_conf_template={SCENARIO / 'broken-nginx.conf.j2'}")
    assert result.returncode != 0
    assert "Test the candidate configuration" in result.stdout
    assert host.file("/etc/nginx/nginx.conf").sha256sum == before
    assert host.service("nginx").is_running
    assert https(door, "/generate")[0] == 401


def test_nginx_is_enabled_and_its_config_tests_clean(host):
    assert host.service("nginx").is_enabled
    assert host.run("nginx -t").rc == 0


# --- secrets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,mode", [
    ("/etc/llmfleet/tls/frontdoor.key", 0o600),
    ("/etc/nginx/llmfleet/keys.map", 0o600),
    ("/etc/nginx/llmfleet/upstream-auth.conf", 0o600),
    ("/etc/nginx/llmfleet-candidate/llmfleet/keys.map", 0o600),
    ("/etc/nginx/llmfleet-candidate/llmfleet/upstream-auth.conf", 0o600),
    ("/etc/llmfleet/tls", 0o700),
    ("/etc/nginx/llmfleet-candidate", 0o700),
])
def test_secret_files_are_root_only(host, path, mode):
    target = host.file(path)
    assert target.exists
    assert target.user == "root"
    assert target.mode == mode


@pytest.mark.parametrize("name", ["ca.key", "clients/ops-admin.key", "clients/backup-admin.key"])
def test_control_node_keys_are_0600(name):
    assert (PKI / name).stat().st_mode & 0o777 == 0o600


def test_keys_are_stored_hashed_only(host):
    for name, key in KEYS.items():
        if key:
            assert host.run("grep -rqF -- %s /etc /var/log /var/lib/nginx /var/lib/llmfleet-frontdoor %s",
                            key, CACHE_DIR).rc == 1, name


def test_no_secret_in_play_output_journal_or_nginx_logs(host):
    log = EPHEMERAL / "ansible.log"
    assert log.exists() and "nginx_tls" in log.read_text(), "converge output was not logged"
    text = log.read_text()
    journal = host.run("journalctl --no-pager -o cat")
    assert journal.rc == 0 and journal.stdout
    nginx_logs = host.run("cat /var/log/nginx/access.log /var/log/nginx/error.log").stdout
    assert "key=guest role=guest" in nginx_logs
    for secret in SECRETS:
        assert secret not in text, "play output"
        assert secret not in journal.stdout, "journal"
        assert secret not in nginx_logs, "nginx logs"


# --- provided certificates (after the fleet-CA tests: it replaces the served certificate) --------

def served_certificate(door, *options):
    served = run(["openssl", "s_client", "-connect", f"{door['address']}:443", "-servername", door["name"],
                  "-showcerts", *options], input="")
    return served, run(["openssl", "x509", "-noout", "-issuer", "-fingerprint"], input=served.stdout).stdout


def make_provided_pki(tmp: Path, name: str) -> None:
    """A root, an intermediate and a leaf for `name`, plus a key that belongs to nothing."""
    def sh(*argv):
        result = run(list(argv), cwd=tmp)
        assert result.returncode == 0, result.stderr

    for key in ["root", "inter", "leaf", "stray"]:
        sh("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{key}.key")
    sh("openssl", "req", "-x509", "-new", "-key", "root.key", "-subj", "/CN=Provided Test Root", "-days", "30",
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
       "-out", "root.crt")
    (tmp / "inter.ext").write_text("basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n")
    sh("openssl", "req", "-new", "-key", "inter.key", "-subj", "/CN=Provided Test Intermediate", "-out", "inter.csr")
    sh("openssl", "x509", "-req", "-in", "inter.csr", "-CA", "root.crt", "-CAkey", "root.key", "-CAcreateserial",
       "-days", "30", "-extfile", "inter.ext", "-out", "inter.crt")
    (tmp / "leaf.ext").write_text(f"subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\n")
    sh("openssl", "req", "-new", "-key", "leaf.key", "-subj", f"/CN={name}", "-out", "leaf.csr")
    sh("openssl", "x509", "-req", "-in", "leaf.csr", "-CA", "inter.crt", "-CAkey", "inter.key", "-CAcreateserial",
       "-days", "30", "-extfile", "leaf.ext", "-out", "leaf.crt")


def test_provided_certificate_with_its_chain_and_a_mismatched_key_refused(host, door, tmp_path):
    make_provided_pki(tmp_path, door["name"])
    provided = ["-e", "nginx_tls_certificate_source=provided",
                "-e", f"nginx_tls_certificate_src={tmp_path / 'leaf.crt'}",
                "-e", f"nginx_tls_certificate_chain_src={tmp_path / 'inter.crt'}"]
    before = served_certificate(door)[1]

    refused = playbook("converge.yml", *provided, "-e", f"nginx_tls_certificate_key_src={tmp_path / 'stray.key'}")
    assert refused.returncode != 0
    assert "was not issued for the key" in refused.stdout
    assert served_certificate(door)[1] == before

    accepted = playbook("converge.yml", *provided, "-e", f"nginx_tls_certificate_key_src={tmp_path / 'leaf.key'}")
    assert accepted.returncode == 0, accepted.stdout[-3000:]
    served, issuer = served_certificate(door, "-CAfile", str(tmp_path / "root.crt"), "-verify_hostname", door["name"],
                                        "-verify_return_error")
    assert served.returncode == 0, served.stderr
    assert "Provided Test Intermediate" in issuer
    assert host.file("/etc/llmfleet/tls/frontdoor.key").mode == 0o600
    key_pem = (tmp_path / "leaf.key").read_text().splitlines()[1]
    assert key_pem not in refused.stdout + accepted.stdout


# --- ACME (last: it replaces the served certificate again) ------------------------------------- -----------------------------------------

ACME = ["-e", "nginx_tls_certificate_source=acme",
        "-e", "nginx_tls_acme_directory=https://{{ ansible_host }}:14000/dir",
        "-e", "nginx_tls_acme_email=ops@example.org", "-e", "nginx_tls_acme_terms_agreed=true",
        "-e", "nginx_tls_acme_validate_certs=false"]


def test_acme_certificate_through_http01_then_nothing_changes(host, door):
    """pebble (prepare.yml) validates HTTP-01 for real through the front door's port 80."""
    first = playbook("converge.yml", *ACME)
    assert first.returncode == 0, first.stdout[-3000:]
    served = run(["openssl", "s_client", "-connect", f"{door['address']}:443", "-servername", door["name"],
                  "-showcerts"], input="")
    issuer = run(["openssl", "x509", "-noout", "-issuer"], input=served.stdout).stdout
    assert "Pebble Intermediate CA" in issuer
    assert "TLSv1.3" in served.stdout
    assert not host.file("/var/lib/llmfleet-frontdoor/acme/.well-known/acme-challenge").listdir()
    assert (PKI / "acme" / "account.key").stat().st_mode & 0o777 == 0o600

    second = playbook("converge.yml", *ACME)
    assert second.returncode == 0, second.stdout[-3000:]
    recap = re.sub(r"\x1b\[[0-9;]*m", "", second.stdout)
    assert re.search(r"changed=0\s", recap[recap.rindex("PLAY RECAP"):])
    for secret in SECRETS:
        assert secret not in first.stdout + second.stdout
