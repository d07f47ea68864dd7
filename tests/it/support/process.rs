//! Helpers for tests that run the binary as a child process.

use std::io::{BufRead, BufReader};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use tokio::sync::mpsc;

/// The child's stdout, line by line (the child must have been spawned with piped stdout).
pub fn stdout_lines(child: &mut Child) -> mpsc::UnboundedReceiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Sends SIGINT and waits (bounded) for the child to exit; kills it and panics on timeout.
pub async fn interrupt_and_wait(child: &mut Child, within: Duration) -> ExitStatus {
    let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(sent.is_ok_and(|s| s.success()), "sending SIGINT failed");
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {within:?} of SIGINT");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
