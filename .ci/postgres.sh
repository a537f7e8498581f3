#!/usr/bin/env bash
# Install (if missing) and start a local PostgreSQL server with a `kubetune`
# role and database, for the store tests and the service benchmark.
#
# Idempotent: safe to run or source any number of times. When sourced it
# exports KUBETUNE_TEST_POSTGRES_URL; when run it prints the URL on stdout.
#
#   source .ci/postgres.sh            # exports KUBETUNE_TEST_POSTGRES_URL
#   export KUBETUNE_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)

_kubetune_pg_setup() {
    local quiet=(-qq -o=Dpkg::Use-Pty=0)
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v pg_ctlcluster >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get "${quiet[@]}" update >/dev/null || return 1
        apt-get "${quiet[@]}" install -y --no-install-recommends postgresql >/dev/null || return 1
    fi
    # The newest installed major version owns the cluster we use.
    local version
    version=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q .; then
        pg_createcluster "$version" main >/dev/null || return 1
    fi
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
        pg_ctlcluster "$version" main start || return 1
    fi
    # Wait for the server to accept connections (a cold start takes a moment).
    local i
    for i in $(seq 1 50); do
        if su postgres -c "psql -qAtX -c 'select 1'" >/dev/null 2>&1; then break; fi
        sleep 0.2
    done
    su postgres -c "psql -qAtX -v ON_ERROR_STOP=1" >/dev/null <<'SQL' || return 1
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kubetune') THEN
    CREATE ROLE kubetune LOGIN PASSWORD 'kubetune' CREATEDB;
  END IF;
END
$$;
SELECT 'CREATE DATABASE kubetune OWNER kubetune'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'kubetune')
\gexec
SQL
}

if _kubetune_pg_setup; then
    export KUBETUNE_TEST_POSTGRES_URL="postgresql+psycopg://kubetune:kubetune@127.0.0.1:5432/kubetune"
    # Print the URL only when executed, so `source` stays quiet.
    if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then echo "$KUBETUNE_TEST_POSTGRES_URL"; fi
else
    echo "postgres.sh: could not set up PostgreSQL" >&2
    if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then exit 1; else return 1; fi
fi
