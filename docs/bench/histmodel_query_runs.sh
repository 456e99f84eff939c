#!/bin/sh
# The page queries at 10,000 and 1,000,000 stored messages on both engines.
for e in sqlite postgres; do
  for n in 10000 1000000; do
    python docs/bench/histmodel_query.py $e $n > docs/bench/histmodel-query-$e-$n.json
  done
done
