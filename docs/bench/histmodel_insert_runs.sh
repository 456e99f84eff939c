#!/bin/sh
# Three alternating rounds of every variant on both engines; one JSON line each.
# Usage: sh docs/bench/histmodel_insert_runs.sh > docs/bench/histmodel-insert.jsonl
for round in 1 2 3; do
  for v in A B C D BD CD G10 G100; do
    for e in sqlite postgres; do
      python docs/bench/histmodel_insert.py $e $v | sed "s/^{/{\"round\": $round, /"
    done
  done
done
