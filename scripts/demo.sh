#!/usr/bin/env sh
# The main job on the shipped MNIST subset (no download): the maxout teacher, the MNIST FitNet trained
# with hints + KD, the same student by plain backprop, then the student-vs-teacher table.
set -eu
FITNETS=${FITNETS:-fitnets}
OUT=${DEMO_DIR:-runs/demo/$(date +%Y-%m-%d_%H-%M-%S)}
common="dataset=mnist_subset teacher_store=$OUT/teachers"
$FITNETS train-teacher $common hydra.run.dir=$OUT/teacher
$FITNETS train $common student=fitnet_mnist schedule=fitnets hydra.run.dir=$OUT/fitnet
$FITNETS train $common student=fitnet_mnist schedule=backprop hydra.run.dir=$OUT/backprop
$FITNETS compare runs=$OUT
