//! Diagnostic: how much of the dynamic radar model's loss comes from *which* patches S keeps.
//! Runs a checkpoint on the test range of its run config with its own top-k DataMask and with
//! oracle DataMasks built from the targets (the patches with VIL >= 16 in any target frame),
//! through the masked forward, and prints CSI-M and MSE for each.
//!
//! `cargo run --release -p dyna-pruner --example oracle_masks -- CHECKPOINT RUN.toml`
//! (defaults: models/radar/synthetic_dynamic, configs/radar/synthetic_dynamic.toml).
use dyna_pruner::checkpoint;
use dyna_pruner::config::RunConfig;
use dyna_pruner::method::FixedMasks;
use dyna_pruner::metrics::Metrics;
use dyna_pruner::train::prepare_data;
use dyna_pruner::CpuBackend;
use dyna_pruner_exec::spec::top_k;
use dyna_pruner_exec::SampleMasks;
use std::path::Path;

fn main() {
    let device = Default::default();
    let args: Vec<String> = std::env::args().collect();
    let checkpoint_dir = args.get(1).map_or("models/radar/synthetic_dynamic", String::as_str);
    let config = args.get(2).map_or("configs/radar/synthetic_dynamic.toml", String::as_str);
    let ck = checkpoint::load::<CpuBackend>(Path::new(checkpoint_dir), &device).expect("checkpoint loads");
    let plan = RunConfig::load(Path::new(config)).expect("run config loads");
    let (splits, scaler) = prepare_data(&plan).expect("data loads");
    let keep = ck.meta.masking.data_keep;
    let w = &splits.test;
    assert_eq!(w.channels, 1, "radar data: one VIL channel");
    let (h, wd, p) = (w.height, w.width, ck.meta.architecture.patch());
    let (hp, wp) = (h.div_ceil(p), wd.div_ceil(p));
    let n = hp * wp;
    let units = ck.meta.architecture.layer_units();
    let t_out = ck.meta.architecture.frames.t_out;
    let k = dyna_pruner::method::masks::kept_count(keep, n);
    // own: the model's top-k of S; oracle: exactly the rainy patches (a count per sample);
    // oracle+S: the rainy patches, topped up by S to the model's count; oracle top-k: the
    // model's count, rainiest patches first.
    let variants = ["own", "oracle", "oracle+S", "oracle top-k"];
    let mut metrics: Vec<Metrics> = variants.iter().map(|_| Metrics::for_windows(w, &scaler, None)).collect();
    let mut kept_sum = [0.0f64; 4];
    for i in 0..w.len() {
        let (x, y) = w.batch::<CpuBackend>(&[i], &scaler, &device);
        let s: Vec<f32> = ck.model.mask_generator.forward(x.clone(), &ck.meta.masking).into_data().to_vec().unwrap();
        let tgt: Vec<f32> = y.into_data().to_vec().unwrap();
        let target = w.target(i);
        // Rain (VIL >= 16, on the data's own 0-255 scale) per patch over the target frames.
        let mut rain = vec![0.0f32; n];
        for t in 0..t_out {
            for yy in 0..h {
                for xx in 0..wd {
                    let v = target[t * h * wd + yy * wd + xx];
                    if v >= 16.0 {
                        rain[(yy / p) * wp + xx / p] += v;
                    }
                }
            }
        }
        let rainy = rain.iter().filter(|&&r| r > 0.0).count();
        // Rainy patches first (rainiest first), then the rest by S.
        let rain_first: Vec<f32> = (0..n).map(|j| if rain[j] > 0.0 { 2.0 + rain[j] } else { s[j] }).collect();
        for (v, variant) in variants.iter().enumerate() {
            let patches = match *variant {
                "own" => top_k(&s, k),
                "oracle" => (0..n).filter(|&j| rain[j] > 0.0).collect(),
                "oracle+S" => top_k(&rain_first, k.max(rainy)),
                _ => top_k(&rain_first, k),
            };
            kept_sum[v] += patches.len() as f64 / n as f64;
            let m = vec![SampleMasks { patches, units: units.iter().map(|&u| (0..u).collect()).collect() }];
            let mut fixed = FixedMasks::<CpuBackend>::new(&m, (hp, wp), &units, p, &device);
            let pred: Vec<f32> = ck.model.forward_masked(x.clone(), &mut fixed).into_data().to_vec().unwrap();
            metrics[v].update(&pred, &tgt);
        }
    }
    for (v, variant) in variants.iter().enumerate() {
        let r = metrics[v].finish();
        println!(
            "{variant:>18}: kept {:.3} csi_m {:.4} csi/16 {:.4} csi/74 {:.4} csi/133 {:.4} mse {:.5}",
            kept_sum[v] / w.len() as f64,
            r["csi_m"],
            r["csi/16"],
            r["csi/74"],
            r["csi/133"],
            r["mse"]
        );
    }
}
