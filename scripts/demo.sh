#!/usr/bin/env bash
# A walk through tierbase branching on a throwaway data dir. Cleans up after itself.
set -euo pipefail
export TIERBASE_HOME="${TIERBASE_DEMO_HOME:-/tmp/tierbase-demo}"
tb() { echo "+ tierbase $*" >&2; tierbase "$@"; }
trap 'tb down --purge >/dev/null || true' EXIT

tb up --btrfs-size 4G
# act as the platform's first engineer by token, as a script should (without one, each command says so)
export TIERBASE_TOKEN="$(cat "$TIERBASE_HOME/api.token")"
tb status
PROD=$(tierbase branch url production)
echo "+ load some data into production"
psql -q "$PROD" -c "CREATE TABLE customer (id int PRIMARY KEY, email text NOT NULL)" \
     -c "INSERT INTO customer SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 100000) g"

tb branch create feature-signup --ttl 2h
FEAT=$(tierbase branch url feature-signup)
echo "+ change the branch: the parent does not see it"
psql -q "$FEAT" -c "ALTER TABLE customer ADD COLUMN signed_up_at timestamptz DEFAULT now()" \
     -c "DELETE FROM customer WHERE id > 50000"
psql -Atc "SELECT 'feature-signup: ' || count(*) || ' customers' FROM customer" "$FEAT"
psql -Atc "SELECT 'production:     ' || count(*) || ' customers' FROM customer" "$PROD"

tb branch create feature-signup-experiment --parent feature-signup
tb branch list
tb branch reset feature-signup
psql -Atc "SELECT 'feature-signup after reset: ' || count(*) || ' customers' FROM customer" "$FEAT"
tb branch delete feature-signup --recursive
tb branch list --json | python3 -c 'import json,sys; print("branches left:", [b["name"] for b in json.load(sys.stdin)])'
