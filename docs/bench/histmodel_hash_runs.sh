#!/bin/sh
# conv as text against conv as a 64-bit hash.
# Usage: sh docs/bench/histmodel_hash_runs.sh > docs/bench/histmodel-insert-hash.jsonl
for round in 1 2 3; do
  for v in A B Bi; do
    for e in sqlite postgres; do
      python docs/bench/histmodel_insert.py $e $v | sed "s/^{/{\"round\": $round, /"
    done
  done
done
