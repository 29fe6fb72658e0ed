use std::path::Path;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    match vmrig_spec::load(Path::new(&path)) {
        Ok(s) => println!("{s:#?}"),
        Err(e) => {
            println!("{e}");
            println!("{:?}", miette::Report::new(e));
        }
    }
}
