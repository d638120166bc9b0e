#!/usr/bin/env bash
# Schema fuzzing: schemathesis generates valid and invalid requests from an OpenAPI document and
# checks every answer — no 5xx, every status documented, the documented content type, the
# documented body schema — against the server's own document (GET /api/v1/openapi.json) and the
# AuthTOTP seed spec (spec/authtotp.openapi.json, its unsatisfiable 400 schema rewritten as
# spec/README explains). Installs schemathesis into a virtualenv under target/ itself.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/schemathesis-venv
EXAMPLES=${SCHEMA_FUZZ_EXAMPLES:-100}
if [ ! -x "$VENV/bin/st" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4,<5'
fi
cargo build --quiet --bin totpd
BIN=${CARGO_TARGET_DIR:-target}/debug/totpd

WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Cheap hashing and no rate limits, so the fuzzer spends its time on the API; the lockout stays
# on (at its most lenient) since it cannot be turned off.
unset $(env | grep -o '^TOTPD_[A-Z0-9_]*' || true)
: > "$WORK/empty.toml"
export TOTPD_CONFIG="$WORK/empty.toml" TOTPD_DATA_DIR="$WORK/data" TOTPD_LOG_LEVEL=warn \
    TOTPD_ARGON2_MEMORY_KIB=64 TOTPD_ARGON2_ITERATIONS=1 \
    TOTPD_RATE_LIMIT_PER_MINUTE=0 TOTPD_RATE_LIMIT_LOGIN_FAILURES_PER_MINUTE=0 \
    TOTPD_LOCKOUT_THRESHOLD=100 TOTPD_ALLOW_REGISTRATION=true
echo "password123" | "$BIN" user add fuzz --password-stdin >/dev/null
"$BIN" serve --listen 127.0.0.1:0 > "$WORK/out" 2> "$WORK/log" &
SERVER_PID=$!
for _ in $(seq 50); do [ -s "$WORK/out" ] && break; sleep 0.1; done
BASE=$(sed 's/^listening on //' "$WORK/out")

login_key() {
    curl -sf -H 'Content-Type: application/json' \
        -d '{"username":"fuzz","password":"password123"}' "$BASE/api/v1/auth/login/" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
st() {
    "$VENV/bin/st" run --no-color --checks "$CHECKS" --mode all --max-examples "$EXAMPLES" \
        --seed 20261127 --generation-database none "$@"
}

fail=0
echo "-- the server's own document, every operation but those that end the session"
st "$BASE/api/v1/openapi.json" -H "Authorization: Token $(login_key)" \
    --exclude-path-regex '^/api/v1/auth/(logout|logout-all|password)/$' || fail=1

echo "-- the server's own document: logout, logout-all and password change, with a fresh key"
st "$BASE/api/v1/openapi.json" -H "Authorization: Token $(login_key)" \
    --include-path-regex '^/api/v1/auth/(logout|logout-all|password)/$' || fail=1

echo "-- the AuthTOTP seed spec, its 400 schema rewritten"
python3 - "$WORK/seed.json" <<'PY'
import json, sys
seed = json.load(open("spec/authtotp.openapi.json"))
string_list = {"type": "array", "items": {"type": "string"}}
seed["components"]["responses"]["400"]["content"]["application/json"]["schema"] = {"anyOf": [
    {"type": "object", "required": ["code"], "minProperties": 2,
     "properties": {"code": {"type": "string"}}, "additionalProperties": string_list},
    {"type": "object", "required": ["non_field_errors", "code"],
     "properties": {"non_field_errors": string_list, "code": {"type": "string"}}},
    {"type": "object", "required": ["detail", "code"],
     "properties": {"detail": {"type": "string"}, "code": {"type": "string"}}},
]}
json.dump(seed, open(sys.argv[1], "w"))
PY
st "$WORK/seed.json" --url "$BASE" -H "Authorization: Token $(login_key)" || fail=1

if grep -qi "panicked" "$WORK/log"; then
    echo "the server log shows a panic:"; grep -i -A3 panicked "$WORK/log"; fail=1
fi
exit $fail
