#!/bin/sh
# The conversations table with and without its (user_id, last_id) index.
# Usage: sh docs/bench/histmodel_d2_runs.sh > docs/bench/histmodel-insert-d2.jsonl
for round in 1 2 3; do
  for v in A BD BD2; do
    for e in sqlite postgres; do
      python docs/bench/histmodel_insert.py $e $v | sed "s/^{/{\"round\": $round, /"
    done
  done
done
