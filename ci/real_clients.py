"""Real clients against the real binary: codes from Debian's oathtool and from pyotp, both
independent of totpd's code, computed from the provisioning URI that setup returns.

For each client: activation and a later login with its codes are accepted; a reused code, a code
two steps behind (before the login's step: a replay), a code eleven steps ahead and a code of
another secret are refused with 400 invalid_code; a code two steps ahead is refused with 400
clock_skew (the clock-drift hint), saying "fast". The two clients must also agree with each other. Prints the figures and
a closing "N passed, N failed" line; exits 1 on any failure.

Usage: python real_clients.py PATH_TO_TOTPD
"""

import base64
import json
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pyotp

PASSWORD = "password123"
# Account names that make the URI's label need percent-encoding (space, colon, non-ASCII).
USERS = {"oathtool": "zoë oathtool", "pyotp": "josé: pyotp"}

passed = 0
failed = []


def check(ok, what):
    global passed
    if ok:
        passed += 1
    else:
        failed.append(what)
        print(f"FAILED: {what}", flush=True)


def start(binary, data_dir):
    config = os.path.join(data_dir, "empty.toml")
    open(config, "w").close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOTPD_")}
    env.update(
        TOTPD_CONFIG=config,
        TOTPD_ARGON2_MEMORY_KIB="64",
        TOTPD_ARGON2_ITERATIONS="1",
        TOTPD_ALLOW_REGISTRATION="true",
        # The per-IP and per-username throttles are not the subject: every request comes from
        # 127.0.0.1 in a few seconds.
        TOTPD_RATE_LIMIT_PER_MINUTE="0",
        TOTPD_RATE_LIMIT_LOGIN_FAILURES_PER_MINUTE="0",
        TOTPD_LOG_LEVEL="warn",
    )
    server = subprocess.Popen(
        [binary, "--data-dir", os.path.join(data_dir, "data"), "serve", "--listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(server.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=30)
    except queue.Empty:
        server.kill()
        sys.exit("totpd printed no listening line within 30 s")
    prefix = "listening on "
    if not line.startswith(prefix):
        server.kill()
        sys.exit(f"unexpected first line from totpd: {line!r}")
    return server, line[len(prefix):].strip()


def call(base, method, path, body=None, key=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + "/api/v1/auth/" + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", "Token " + key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def oathtool_code(uri, t):
    """What an app built on oathtool shows: the secret and parameters read from the URI."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
    secret = query["secret"][0]
    digits = query.get("digits", ["6"])[0]
    period = query.get("period", ["30"])[0]
    algorithm = query.get("algorithm", ["SHA1"])[0]
    out = subprocess.run(
        ["oathtool", f"--totp={algorithm}", "--base32", f"--digits={digits}",
         f"--time-step-size={period}s", f"--now=@{t}", secret],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def pyotp_code(uri, t):
    return pyotp.parse_uri(uri).at(t)


CLIENTS = {"oathtool": oathtool_code, "pyotp": pyotp_code}


def other_secret_uri(uri):
    """The same URI with another random secret."""
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(parts.query)
    query["secret"] = [base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")]
    return parts._replace(query=urllib.parse.urlencode(query, doseq=True)).geturl()


def away_from_step_edge():
    """Now, at least 5 s before the step turns, so 'two steps away' stays two steps away."""
    while int(time.time()) % 30 >= 25:
        time.sleep(0.5)
    return int(time.time())


def run_client(base, client):
    code_at = CLIENTS[client]
    name = USERS[client]
    figures = {"accepted": 0, "refused": 0}

    status, body = call(base, "POST", "register/", {"username": name, "password": PASSWORD})
    check(status == 201, f"{client}: register {name!r}: {status} {body}")
    status, body = call(base, "POST", "login/", {"username": name, "password": PASSWORD})
    key = body.get("key") if isinstance(body, dict) else None
    check(status == 200 and key, f"{client}: login: {status} {body}")
    status, setup = call(base, "POST", "totp/setup/", key=key)
    check(status == 201, f"{client}: setup: {status} {setup}")
    uri = setup["provisioning_uri"]

    # The URI as pyotp reads it names the right account and issuer.
    parsed = pyotp.parse_uri(uri)
    check(parsed.name == name and parsed.issuer == "totpd",
          f"{client}: pyotp reads the URI as {parsed.name!r} / {parsed.issuer!r}")

    now = away_from_step_edge()
    agree = oathtool_code(uri, now) == pyotp_code(uri, now) == code_at(uri, now)
    check(agree, f"{client}: oathtool and pyotp disagree at {now}")
    status, body = call(base, "POST", "totp/activate/", {"token": code_at(uri, now)}, key=key)
    check(status == 200 and len(body.get("recovery_codes", [])) == 10,
          f"{client}: activation with its code: {status} {body}")
    figures["accepted"] += status == 200

    def verify(code):
        status, body = call(base, "POST", "login/", {"username": name, "password": PASSWORD})
        temp = body.get("temp_token")
        check(status == 200 and temp, f"{client}: password step: {status} {body}")
        if not temp:
            return status, body
        return call(base, "POST", "totp/verify/", {"temp_token": temp, "token": code})

    # The next step's code, as the app shows it 30 s later, logs in.
    now = away_from_step_edge()
    next_code = code_at(uri, now + 30)
    status, body = verify(next_code)
    check(status == 200 and "key" in body, f"{client}: verify with its next code: {status} {body}")
    figures["accepted"] += status == 200

    wrong_uri = other_secret_uri(uri)
    now = away_from_step_edge()
    valid = {code_at(uri, now + 30 * k) for k in (-1, 0, 1)}
    wrong = code_at(wrong_uri, now)
    while wrong in valid:  # one chance in ~330 000
        wrong_uri = other_secret_uri(uri)
        wrong = code_at(wrong_uri, now)
    # Far codes collide with a near step's code (and get the hint) one time in ~50 000: skip then.
    near = {code_at(uri, now + 30 * k) for k in range(-10, 11)}
    far = code_at(uri, now + 330)
    cases = [
        ("the same code again", next_code, "invalid_code", "Invalid code."),
        ("a code 2 steps ahead", code_at(uri, now + 60), "clock_skew", "seconds fast."),
        # Before the step of the login above: a replay, which gets no hint.
        ("a code 2 steps behind", code_at(uri, now - 60), "invalid_code", "Invalid code."),
    ]
    cases += [(what, code, "invalid_code", "Invalid code.")
              for what, code in [("a code 11 steps ahead", far), ("a code of another secret", wrong)]
              if code not in near]
    for what, code, expected, says in cases:
        status, body = verify(code)
        message = " ".join(body.get("token", [])) if isinstance(body, dict) else ""
        refused = status == 400 and body.get("code") == expected and says in message
        check(refused, f"{client}: {what} must be refused ({expected}): {status} {body}")
        figures["refused"] += refused
    return figures


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as data_dir:
        server, base = start(binary, data_dir)
        try:
            results = {client: run_client(base, client) for client in CLIENTS}
        finally:
            server.terminate()
            server.wait(timeout=20)
    for client, figures in results.items():
        print(f"real clients: {client}: {figures['accepted']} codes accepted (activate, verify), "
              f"{figures['refused']} refused (reused, 2 steps ahead and behind, 11 ahead, wrong secret)")
    print(f"real-clients: {passed} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
