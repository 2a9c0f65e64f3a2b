module mlart

go 1.22
