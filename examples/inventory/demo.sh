#!/usr/bin/env bash
# The split-column refactoring, end to end, on a throwaway platform:
#   a feature branch -> staging -> production (expand, then contract),
#   a destructive test on a branch with ~1% corrupted codes,
#   and a promotion that fails on production and is rolled back by repoint.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d /tmp/tierbase-inventory-XXXXXX)"
chmod 711 "$work"
export TIERBASE_HOME="$work/home"
cp -r "$here" "$work/app"
app="$work/app"
mig="$app/db/migrations"
mkdir -p "$work/later"
mv "$mig"/[VU]0002__*.sql "$mig"/V0003__*.sql "$work/later/"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
tb() { echo "+ tierbase $*" >&2; tierbase "$@"; }
trap 'tierbase down --purge >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

say "platform up; V0001 reaches production by promotion; production gets its 10,000 rows"
tb up --btrfs-size 4G >/dev/null
# act as the platform's first engineer by token, as a script should (without one, each command says so)
OWNER_TOKEN="$(cat "$TIERBASE_HOME/api.token")"
export TIERBASE_TOKEN="$OWNER_TOKEN"
tb branch create bootstrap >/dev/null
tb migrate apply --branch bootstrap --dir "$mig"
tb promote production --from bootstrap --dir "$mig"
tb import "$app/seed.sql"
tb policy reload --file "$app/tierbase.toml"
tb branch list --no-bytes

say "a developer branches off staging (the entry tier) and writes the expand migration"
DEV=$(tierbase principal create jen --role developer --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
export TIERBASE_TOKEN="$DEV"
cp "$work/later"/[VU]0002__*.sql "$mig/"
tb branch create split-code
tb migrate lint
tb migrate verify --parent split-code

say "destructive test: corrupt ~1% of the codes on a throwaway branch, run the backfill"
tb branch create split-code-chaos --parent split-code --ttl 1h
psql -q "$(tierbase branch url split-code-chaos)" -f "$app/corrupt.sql"
tb migrate apply --branch split-code-chaos
psql "$(tierbase branch url split-code-chaos)" -c \
  "SELECT reason, count(*), min(code) AS example FROM inventory_code_rejects GROUP BY reason"
psql -Atc "SELECT 'normalised (spaces removed) and split: ' || count(*) FROM inventory
           WHERE inventory_code ~ '\s' AND location_code IS NOT NULL" "$(tierbase branch url split-code-chaos)"
tb branch delete split-code-chaos

say "the real branch: apply, run the app's tests against it"
tb migrate apply --branch split-code
DATABASE_URL=$(tierbase branch url split-code) python3 -m pytest -q "$app/tests"

say "merge into staging (promotion is merge), then CI promotes staging -> production"
tb promote staging --from split-code
export TIERBASE_TOKEN="$OWNER_TOKEN"  # back to the platform engineer
CI=$(tierbase principal create ci-bot --role ci --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
TIERBASE_TOKEN="$CI" tb promote production
tb diff qa production --format markdown | head -30

say "one deploy cycle later: contract (drop inventory_code)"
cp "$work/later"/V0003__*.sql "$mig/"
tb branch create contract --parent staging
tb migrate apply --branch contract
tb promote staging --from contract
TIERBASE_TOKEN="$CI" tb promote production

say "a promotion that fails on production: unique serials, validated on staging..."
cat > "$mig/V0004__unique_serial_numbers.sql" <<'SQL'
ALTER TABLE inventory ADD CONSTRAINT inventory_serial_unique UNIQUE (serial_number);
SQL
tb branch create unique-serials --parent staging
tb migrate apply --branch unique-serials
tb promote staging --from unique-serials
echo "...but production took a write with a duplicate serial meanwhile"
psql -q "$(tierbase branch url production)" -c \
  "INSERT INTO inventory (sku, quantity, location_code, batch_number, serial_number) VALUES ('DUP', 1, 'W01', 1, 1)"
TIERBASE_TOKEN="$CI" tb promote production || echo "(exit $?: refused and rolled back, as expected)"
tb promotions
tb route list | grep production
say "production answers from its pre-promotion snapshot; the failed state is kept for forensics"
psql -Atc "SELECT 'production rows: ' || count(*) FROM inventory" "$(tierbase branch url production)"
