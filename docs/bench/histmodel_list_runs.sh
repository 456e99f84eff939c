#!/bin/sh
for e in sqlite postgres; do
  for n in 10000 1000000; do
    (cd docs/bench && python histmodel_list.py $e $n) > docs/bench/histmodel-list-$e-$n.json
  done
done
