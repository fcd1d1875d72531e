#!/bin/bash
# issue 20's measurements, one after another on the otherwise idle 2-core machine
cd /work/main
R=benchmarks/results; L=$R/logs
run() { name=$1; shift; echo "=== $(date -u +%FT%TZ) $name: $*" | tee -a $L/issue20_runs.log
  /usr/bin/time -v "$@" > $L/$name.log 2>&1; echo "=== $(date -u +%FT%TZ) $name exit $?" | tee -a $L/issue20_runs.log; }
P=".venv/bin/python -m pytest -p no:cacheprovider -s -q --benchmark-only"
run roofline_reduced $P benchmarks/test_predict_roofline.py --benchmark-json $R/cpu_predict_roofline_2core.json
run e2e_reduced $P benchmarks/test_predict_e2e.py --benchmark-json $R/cpu_predict_e2e_2core.json
run scaling_full $P --full-sweep benchmarks/test_scaling_perf.py --benchmark-json $R/cpu_scaling_2core.json
run e2e_full $P --full-sweep benchmarks/test_predict_e2e.py --benchmark-json $R/cpu_predict_e2e_1024_2core.json
run roofline_full $P --full-sweep benchmarks/test_predict_roofline.py --benchmark-json $R/cpu_predict_roofline_1024_2core.json
echo "=== all done" | tee -a $L/issue20_runs.log
#!/bin/bash
cd /work/main
R=benchmarks/results; L=$R/logs
echo "=== $(date -u +%FT%TZ) scaling_infer_rerun (the inference rows of scaling_full ran while other tests ran at nice 19; measured again on the idle machine): pytest --benchmark-only --full-sweep -k infer benchmarks/test_scaling_perf.py" >> $L/issue20_runs.log
.venv/bin/python -m pytest -p no:cacheprovider -s -q --benchmark-only --full-sweep -k infer benchmarks/test_scaling_perf.py --benchmark-json $R/cpu_scaling_infer_2core.json > $L/scaling_infer_rerun.log 2>&1
echo "=== $(date -u +%FT%TZ) scaling_infer_rerun exit $?" >> $L/issue20_runs.log
