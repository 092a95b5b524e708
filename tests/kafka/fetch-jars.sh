#!/usr/bin/env bash
# Copies the Kafka broker's runtime jars from Maven Central (cached in ~/.m2) into .cache/kafka-libs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
libs="$root/.cache/kafka-libs"
stamp="$libs/.complete-$(sha256sum "$here/pom.xml" | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "kafka jars: cached in $libs"
  exit 0
fi
rm -rf "$libs"
mkdir -p "$libs"
mvn -B -q -f "$here/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs"
ls "$libs"/kafka_2.13-*.jar >/dev/null
touch "$stamp"
echo "kafka jars: $(ls "$libs" | wc -l) jars in $libs"
