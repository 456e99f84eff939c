#!/bin/sh
# Groups without per-member rows (K) against A, three alternating rounds.
# Usage: sh docs/bench/histmodel_group_runs.sh > docs/bench/histmodel-insert-groups.jsonl
for round in 1 2 3; do
  for v in A K10 K100; do
    for e in sqlite postgres; do
      python docs/bench/histmodel_insert.py $e $v | sed "s/^{/{\"round\": $round, /"
    done
  done
done
# The insert without the index messages_created (retention by id), A and B.
for round in 1 2 3; do
  for v in A Ax B Bx; do
    for e in sqlite postgres; do
      python docs/bench/histmodel_insert.py $e $v | sed "s/^{/{\"round\": $round, /"
    done
  done
done >> docs/bench/histmodel-insert-noindex.jsonl
