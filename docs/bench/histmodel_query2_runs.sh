#!/bin/sh
# A second run of the page queries, with model C2 added (histmodel-query2-*).
for e in sqlite postgres; do
  for n in 10000 1000000; do
    python docs/bench/histmodel_query.py $e $n > docs/bench/histmodel-query2-$e-$n.json
  done
done
