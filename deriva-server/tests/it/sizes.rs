//! Recorded output sizes outlive the process: the local store keeps them in `deriva.redb`
//! (`output_sizes`, written without an fsync of their own), so after a restart the memory
//! budget's up-front check refuses a recipe whose output is known to be too big, without
//! computing it.

use deriva_testkit::{ServerProcess, get_all, put_leaf, put_recipe, sample};
use tonic::Code;

/// Computes of `gunzip/v1` on `server`.
async fn gunzips(server: &ServerProcess) -> f64 {
    sample(
        &server.scrape().await,
        r#"deriva_compute_duration_seconds_count{function="gunzip/v1"}"#,
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipe_known_too_big_is_refused_up_front_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = ServerProcess::options().dir(dir.path()).start();
    let mut client = first.client().await;
    // A small leaf whose gunzip is 48 MiB: the input tells nothing of the output's size.
    let zeros = put_leaf(&mut client, &vec![0u8; 48 << 20]).await;
    let gzip = put_recipe(&mut client, "gzip", &[&zeros], &[]).await;
    let bomb = get_all(&mut client, &gzip).await.unwrap();
    assert!(bomb.len() < 1 << 20, "{} bytes of gzip", bomb.len());
    let bomb = put_leaf(&mut client, &bomb).await;
    let big = put_recipe(&mut client, "gunzip", &[&bomb], &[]).await;
    assert_eq!(get_all(&mut client, &big).await.unwrap().len(), 48 << 20);
    assert_eq!(gunzips(&first).await, 1.0);
    // A later durable commit of the recipe database carries the size to the disk.
    put_recipe(&mut client, "identity", &[&bomb], &[]).await;
    drop(client);
    first.stop();

    let second = ServerProcess::options()
        .dir(dir.path())
        .args(["--memory-budget", "32MiB"])
        .start();
    let mut client = second.client().await;
    let refused = match get_all(&mut client, &big).await {
        Ok(out) => panic!("served {} bytes instead of refusing", out.len()),
        Err(e) => e,
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("gunzip/v1"),
        "{}",
        refused.message()
    );
    assert_eq!(gunzips(&second).await, 0.0, "refused before computing");
}
