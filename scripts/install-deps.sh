#!/usr/bin/env bash
# Install the Debian packages tierbase needs, if missing. Needs root (or sudo) on a fresh machine.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
command -v mkfs.btrfs >/dev/null || [ -x /usr/sbin/mkfs.btrfs ] || need+=(btrfs-progs)
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
# tests/test_clients.py: real clients through the proxy (node-postgres itself comes from npm, in the test)
ls /usr/lib/postgresql/*/lib/pgxs/src/test/regress/pg_regress >/dev/null 2>&1 || need+=(postgresql-client)
[ -f /usr/share/java/postgresql.jar ] || need+=(libpostgresql-jdbc-java)
command -v javac >/dev/null || need+=(default-jdk-headless)  # `java Foo.java` needs the JDK's compiler
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
# rollback replay by logical decoding (tierbase/migrate/logical.py): wal2json for the server's major version
for major in $(ls /usr/lib/postgresql 2>/dev/null || echo 15); do
  [ -f "/usr/lib/postgresql/$major/lib/wal2json.so" ] || need+=("postgresql-$major-wal2json")
done
# scripts/service-python.sh: a venv of Debian's python3 the unprivileged service user can run
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
# Debian's package may start its own cluster on 5432; tierbase does not use it.
