//! The serial console: the agent's log goes there (and into the `ReadLog`
//! ring), and a one-line command protocol on it (`poweroff`) lets an
//! operator end the VM.

use std::io::{BufRead, Write};

/// Writes one log line to the console (the kernel hands PID 1 the console as
/// its stdio).
pub fn log(message: &str) {
    let line = format!("husk-agent: {message}\n");
    crate::logging::record_plain_line(&line);
    let mut stderr = std::io::stderr().lock();
    // Nothing better to do with a console write error in PID 1.
    let _ = stderr.write_all(line.as_bytes());
}

/// Reads commands from the console until `poweroff` or end of input.
pub fn serve_commands() {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("poweroff") => {
                log("power-off requested on the console");
                return;
            }
            Ok("") => {}
            Ok(other) => log(&format!(
                "unknown console command '{other}' (known: poweroff)"
            )),
            Err(error) => {
                log(&format!("console read failed: {error}"));
                break;
            }
        }
    }
    // No console input (none attached): stay up until powered off otherwise.
    loop {
        std::thread::park();
    }
}
